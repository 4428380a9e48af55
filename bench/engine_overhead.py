"""Host time per decode step of the engine: scheduling, block bookkeeping, step inputs, greedy
pick and finish checks, with a program that does no work (it returns zero logits). On a GPU this
time adds to every decode step the card runs.

Two pools: ``free`` (the pool has room to spare) and ``full`` (the radix cache holds enough
finished prompts that the free list is empty, the steady state of a long-running server: every
block a decode step needs comes from eviction).

    .venv/bin/python bench/engine_overhead.py [--rounds 3] [--against REV]

Each build is measured in a worker process of its own that imports ``qcompiler`` as installed:
this checkout's through the environment running the script (``make install``). ``--against REV``
adds another git revision: a ``git worktree add --detach`` of REV in a temporary directory,
installed with ``pip install --no-deps --target`` into that directory and put first on the
worker's ``PYTHONPATH`` (its native kernels build under their own ``QCOMPILER_CACHE``). The
workers alternate within each round; the worktree is removed at exit.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

VOCAB = 256
PAGED = dict(num_layers=1, num_kv_heads=1, head_dim=8)
BLOCK = 16


def install_revision(rev: str, into: str) -> dict:
    """``rev`` checked out as a worktree under ``into`` and installed there; the environment of a
    worker that imports it."""
    top = subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip()
    src, site = os.path.join(into, "src"), os.path.join(into, "site")
    subprocess.check_call(["git", "-C", top, "worktree", "add", "--quiet", "--detach", src, rev])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", site, src])
    return dict(os.environ, PYTHONPATH=site, QCOMPILER_CACHE=os.path.join(into, "cache"))


def remove_revision(into: str) -> None:
    top = subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip()
    subprocess.call(["git", "-C", top, "worktree", "remove", "--force", os.path.join(into, "src")])
    shutil.rmtree(into, ignore_errors=True)


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


class Worker:
    """A process measuring one build: it reads ``pool batch`` lines and answers ms per step."""

    def __init__(self, args, env=None):
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--prompt", str(args.prompt),
               "--new", str(args.new), "--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.origin = self.proc.stdout.readline().strip()  # where its qcompiler comes from

    def decode_ms(self, pool: str, batch: int) -> float:
        self.proc.stdin.write(f"{pool} {batch}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"worker exited with {self.proc.wait()}"
        return float(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def serve(args) -> None:
    from qcompiler import runtime as rt
    print(os.path.dirname(rt.__file__), flush=True)
    for line in sys.stdin:
        pool, batch = line.split()
        print(decode_ms(rt, int(batch), args.prompt, args.new, pool), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", help="a git revision to measure beside this checkout")
    ap.add_argument("--batches", default="1,32,128,256")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # a worker (see Worker)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.serve:
        return serve(args)
    tmp = tempfile.mkdtemp() if args.against else None
    workers = {}
    try:
        workers["this"] = Worker(args)
        if args.against:
            workers[args.against] = Worker(args, install_revision(args.against, tmp))
        for k, w in workers.items():
            print(f"{k}: qcompiler.runtime from {w.origin}")
        print(f"threads {args.threads}, prompt {args.prompt} (half shared), {args.new} new tokens, block {BLOCK}, "
              f"medians of {args.rounds} rounds (min-max), ms per decode step")
        for pool in ("free", "full"):
            for batch in map(int, args.batches.split(",")):
                times = {k: [] for k in workers}
                for _ in range(args.rounds):  # the builds alternate within each round
                    for k, w in workers.items():
                        times[k].append(w.decode_ms(pool, batch))
                cells = [f"{k} {statistics.median(v):7.3f} ({min(v):.3f}-{max(v):.3f})" for k, v in times.items()]
                if args.against:
                    cells.append(f"{statistics.median(times[args.against]) / statistics.median(times['this']):5.1f}x")
                print(f"pool {pool:4} batch {batch:3}: " + "  ".join(cells), flush=True)
    finally:
        for w in workers.values():
            w.close()
        if tmp:
            remove_revision(tmp)


if __name__ == "__main__":
    main()
