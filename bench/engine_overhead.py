"""Host time per decode step of the engine: scheduling, block bookkeeping, step inputs, greedy
pick and finish checks, with a program that does no work (it returns zero logits). On a GPU
this time adds to every step the card runs; an H200 runs a Llama-2-7B W4A16 decode step
in ~0.8 ms at the weight-bandwidth roofline, so it is the budget this must stay well under.

Two pools: ``free`` (the pool has room to spare) and ``full`` (the radix cache holds enough
finished prompts that the free list is empty, the steady state of a long-running server:
every block a decode step needs comes from eviction). ``--against REV`` loads another git
revision's ``runtime/`` beside this checkout's and alternates the two in rounds.

    python bench/engine_overhead.py --against HEAD~1
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

VOCAB = 256
PAGED = dict(num_layers=1, num_kv_heads=1, head_dim=8)
BLOCK = 16


def load_runtime(root: str, name: str):
    """``root/runtime`` as the package ``qcompiler.<name>``: beside ``qcompiler.runtime``, it
    shares this checkout's ``qcompiler.codegen`` (the sampler's native code)."""
    name = f"qcompiler.{name}"
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "runtime", "__init__.py"),
                                                  submodule_search_locations=[os.path.join(root, "runtime")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def revision(rev: str, into: str) -> str:
    """``rev``'s ``runtime/`` extracted under ``into``."""
    top = subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip()
    files = subprocess.check_output(["git", "-C", top, "ls-tree", "--name-only", rev, "runtime/"], text=True).split()
    os.makedirs(os.path.join(into, "runtime"), exist_ok=True)
    for f in files:
        with open(os.path.join(into, f), "wb") as out:
            out.write(subprocess.check_output(["git", "-C", top, "show", f"{rev}:{f}"]))
    return into


def no_work(ids, pos, kv, slots, tables, lens, starts, rows):
    return torch.zeros(rows.shape[0], VOCAB)


def engine(rt, batch: int, prompt: int, new: int, pool: str):
    if pool == "free":
        num_blocks, cached = 2 * batch * -(-(prompt + new) // BLOCK), 0
    else:  # the batch's prompt blocks (the shared half once) and one more, beside the cached prompts
        cached = 4 * batch * -(-(prompt + new) // BLOCK)  # finished prompts left in the radix cache
        num_blocks = cached + prompt // 2 // BLOCK + batch * -(-(prompt - prompt // 2) // BLOCK) + 1
    runner = rt.engine.ModelRunner(no_work, PAGED, torch.float32, num_blocks, BLOCK)
    eng = rt.engine.Engine(runner, num_blocks, BLOCK, max_num_seqs=batch, max_num_batched_tokens=1 << 20)
    params = rt.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i in range(cached // 4):  # 64-token prompts: 4 blocks each
        eng.add_request([10_000 + i] * 63 + [7], params)
    while eng.scheduler.has_work():
        eng.step()
    return eng


def decode_ms(rt, batch: int, prompt: int, new: int, pool: str) -> float:
    """ms per decode step of ``batch`` sequences whose prompts share their first half."""
    eng = engine(rt, batch, prompt, new, pool)
    params = rt.SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    shared = list(range(1, prompt // 2 + 1))
    reqs = [eng.add_request(shared + [1000 + i] * (prompt - len(shared)), params) for i in range(batch)]
    while any(not r.seq.completion_token_ids for r in reqs):
        eng.step()
    if pool == "full":
        grow = batch * -(-new // BLOCK)
        assert eng.bm.num_free < grow, f"decode should evict: {eng.bm.num_free} blocks free, {grow} to take"
    steps, t0 = 0, time.perf_counter()
    while not all(r.done for r in reqs):
        eng.step()
        steps += 1
    return 1e3 * (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", help="a git revision to measure beside this checkout")
    ap.add_argument("--batches", default="1,32,128,256")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runtimes = {"this": importlib.import_module("qcompiler.runtime")}
    if args.against:
        runtimes[args.against] = load_runtime(revision(args.against, tempfile.mkdtemp()), "runtime_base")
    print(f"threads {args.threads}, prompt {args.prompt} (half shared), {args.new} new tokens, block {BLOCK}, "
          f"medians of {args.rounds} rounds (min-max), ms per decode step")
    for pool in ("free", "full"):
        for batch in map(int, args.batches.split(",")):
            times = {k: [] for k in runtimes}
            for _ in range(args.rounds):  # candidates alternate within each round
                for k, rt in runtimes.items():
                    times[k].append(decode_ms(rt, batch, args.prompt, args.new, pool))
            cells = [f"{k} {statistics.median(v):7.3f} ({min(v):.3f}-{max(v):.3f})" for k, v in times.items()]
            if args.against:
                cells.append(f"{statistics.median(times[args.against]) / statistics.median(times['this']):5.1f}x")
            print(f"pool {pool:4} batch {batch:3}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
