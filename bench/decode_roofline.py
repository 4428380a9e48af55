"""One batch-1 decode step against this machine's memory roofline, and where its time goes.

    .venv/bin/python bench/decode_roofline.py [--threads 1 2] [--artifacts w4a16 w4a16-h16]

- read bandwidth: the median of fp32 ``sum`` over 1 GiB (far past the caches) at each thread count;
- bytes a decode step must read: every constant the lowered program reads per token (packed
  weights, scales, float weights such as a bf16 lm_head, norms) except the embedding table (one
  row), plus the KV cache of a 32-token context;
- the step's time on the default path (compiled ahead of time) and eagerly, median of 64 steps
  after a 32-token prompt: roofline fraction = (bytes / bandwidth) / step time;
- a profile of the eager step (torch.profiler, self CPU time by op), the same work op by op.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "examples"))

from serving import artifact, cpu_name  # noqa: E402

from qcompiler import LLM, SamplingParams  # noqa: E402
from qcompiler.runtime.step_inputs import step_inputs  # noqa: E402


def bandwidth(threads: int) -> float:
    torch.set_num_threads(threads)
    x = torch.ones(1 << 28)  # 1 GiB
    x.sum()
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    return x.nbytes / statistics.median(ts)


def step_bytes(llm: LLM) -> int:
    gm = llm.model.program
    embedding = {n.args[0].target for n in gm.graph.nodes
                 if n.op == "call_function" and "embedding" in str(n.target) and n.args[0].op == "get_attr"}
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"} - embedding
    weights = sum(getattr(gm, name).nbytes for name in read if isinstance(getattr(gm, name), torch.Tensor))
    # the packed kernel reads packed weights, not the canonical copies the graph also carries
    canonical = {n.args[i].target for n in gm.graph.nodes if n.op == "call_function" and "wq_linear" in str(n.target)
                 for i in (4, 5, 6) if n.args[i] is not None}
    weights -= sum(getattr(gm, name).nbytes for name in canonical)
    kv = llm.engine.runner.kv_cache
    per_token = kv[:, :, 0, 0].nbytes
    return weights + 33 * per_token


def step_ms(llm: LLM, threads: int) -> float:
    torch.set_num_threads(threads)
    eng = llm.engine
    prompt = list(range(100, 132))
    req = eng.add_request(prompt, SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True))
    stamps = []
    while req.finish_reason is None:
        eng.step()
        stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps[8:], stamps[9:])]
    return 1000 * statistics.median(steps)


def profile(llm: LLM, threads: int) -> None:
    torch.set_num_threads(threads)
    prog = llm.model.program
    kv = llm.engine.runner.kv_cache
    inp = step_inputs([[0, 1, 2]], [32], [[7]], llm.engine.runner.block_size)
    with torch.no_grad():
        for _ in range(5):
            prog(*inp.args(kv))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
            for _ in range(20):
                prog(*inp.args(kv))
    rows = sorted(((e.key, e.self_cpu_time_total / 20, e.count // 20) for e in p.key_averages()), key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    print(f"\neager step op profile, {threads} thread(s): {total / 1000:.2f} ms of self CPU time")
    print("| op | µs per step | calls | share |")
    print("|---|---|---|---|")
    for k, us, c in rows[:10]:
        print(f"| `{k}` | {us:.0f} | {c} | {us / total:.0%} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--artifacts", nargs="+", default=["w4a16", "w4a16-h16"])
    a = ap.parse_args()
    print(cpu_name())
    bw = {t: bandwidth(t) for t in a.threads}
    for name in a.artifacts:
        default, eager = LLM(artifact(name), prefix_cache=False), LLM(artifact(name), prefix_cache=False, compile="eager")
        nbytes = step_bytes(eager)
        print(f"\n### {name}: {nbytes / 2**20:.1f} MiB read per decode step (32-token context)\n")
        print("| threads | read GB/s | roofline ms | default ms | of roofline | tok/s | eager ms | of roofline |")
        print("|---|---|---|---|---|---|---|---|")
        for t in a.threads:
            roof = 1000 * nbytes / bw[t]
            d = statistics.median(step_ms(default, t) for _ in range(3))
            e = statistics.median(step_ms(eager, t) for _ in range(3))
            print(f"| {t} | {bw[t] / 1e9:.1f} | {roof:.2f} | {d:.2f} | {roof / d:.0%} | {1000 / d:.1f} | {e:.2f} | "
                  f"{roof / e:.0%} |")
        profile(eager, a.threads[0])


if __name__ == "__main__":
    main()
