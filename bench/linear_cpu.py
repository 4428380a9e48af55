"""qc::w4a16_linear / qc::w8a16_linear CPU paths (our kernel with AVX-512 and with AVX2, where the
CPU has them; torch's int4pack/int8pack) vs fp32 and bf16 F.linear on SmolLM2-135M's linear
shapes, M = 1, 16, 256 tokens.

    .venv/bin/python bench/linear_cpu.py [--threads 1] [--group-size 64]

Each candidate cycles through enough weight copies to exceed twice the last-level cache, so
every figure is a DRAM figure (a real model's weights do not sit in cache between tokens).
Candidates run in alternating rounds; each figure is the median over rounds of the mean
time per call (µs), with min–max."""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from qcompiler.codegen import cpu_native
from qcompiler.codegen.cpu import pack_int4_for_cpu
from qcompiler.codegen.ops import quantized_linear_ref
from qcompiler.codegen.quant import quantize_weight

qc = torch.ops.qc
SHAPES = {"q/o_proj": (576, 576), "k/v_proj": (576, 192), "gate/up_proj": (576, 1536), "down_proj": (1536, 576),
          # what qcompiler.load runs on CPU: siblings reading one input merged into one call
          "qkv merged": (576, 960), "gate+up merged": (576, 3072)}
# one decoder layer, as the float model runs it and as the lowered W4A16 program runs it
LAYER_FLOAT = ["q/o_proj", "k/v_proj", "k/v_proj", "q/o_proj", "gate/up_proj", "gate/up_proj", "down_proj"]
LAYER_LOWERED = ["qkv merged", "q/o_proj", "gate+up merged", "down_proj"]
LLC_BYTES = 300 * 2**20
ISA_NAMES = {"vnni": "AVX-512 VNNI, int8 activations", "avx512": "AVX-512", "avx2": "AVX2"}  # our kernel at each level this CPU runs (qc_cpu::set_isa)


def isa_of(name: str) -> int:
    return next((cpu_native.LEVELS[i] for i, n in ISA_NAMES.items() if f"({n})" in name), 0)


def copies_for(nbytes: int) -> int:
    return max(2, int(2 * LLC_BYTES // nbytes) + 1)


def make_candidates(K: int, N: int, G: int):
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.02
    q4 = quantize_weight(w, 4, G, symmetric=False)
    q8 = quantize_weight(w, 8, None, symmetric=True)
    p4 = pack_int4_for_cpu(*q4)
    torch.compiler.reset()  # a fresh compile per shape: no recompile limit, no eager fallback
    compiled = torch.compile(lambda x, q, s, z: quantized_linear_ref(x, q, s, z, None, 4), dynamic=False)
    wb = w.bfloat16()
    per = {  # name -> (weights to rotate (one copy), bytes, call(x, weights))
        "fp32 F.linear": ((w,), w.numel() * 4, lambda x, t: F.linear(x, t[0])),
        "bf16 F.linear": ((wb,), w.numel() * 2, lambda x, t: F.linear(x.bfloat16(), t[0])),
        "w4a16 torch int4pack": ((*p4, *q4), sum(t.numel() * t.element_size() for t in p4),
                                     lambda x, t: qc.w4a16_linear_cpu(x, t[0], t[1], t[2], t[3], t[4], None)),
        "w4a16 Inductor dequant+GEMM": (tuple(q4), sum(t.numel() * t.element_size() for t in q4),
                                        lambda x, t: compiled(x, *t)),
        "w8a16 torch int8pack": ((q8.qweight, q8.scales), q8.qweight.numel() + q8.scales.numel() * 4,
                                     lambda x, t: qc.w8a16_linear_cpu(x, t[0], t[1], None, None)),
    }
    if cpu_native.available():
        for bits, q in ((4, q4), (8, q8)):
            for isa in [i for i in ("vnni", "avx512", "avx2") if cpu_native.LEVELS[i] <= cpu_native.LEVELS[cpu_native.ISA]]:
                pn = cpu_native.pack_native(*q, bits, isa)
                per[f"w{bits}a16 ours ({ISA_NAMES[isa]})"] = (
                    (*pn, *q), sum(t.numel() * t.element_size() for t in pn),
                    lambda x, t, b=bits: qc.wq_linear_native(x, t[0], t[1], t[2], t[3], t[4], t[5], None, b))
    out = {}
    for name, (ws, nbytes, fn) in per.items():
        out[name] = ([tuple(None if t is None else t.clone() for t in ws) for _ in range(copies_for(nbytes))], fn)
    return out


def time_round(x, copies, fn, calls: int) -> float:
    for i in range(3):
        fn(x, copies[i % len(copies)])
    t0 = time.perf_counter()
    for i in range(calls):
        fn(x, copies[i % len(copies)])
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ms", type=int, nargs="*", default=[1, 16, 256])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}, torch {torch.__version__}, group {a.group_size}, rounds {a.rounds}")
    rows = []
    with torch.no_grad():
        for shape, (K, N) in SHAPES.items():
            cands = make_candidates(K, N, a.group_size)
            for M in a.ms:
                x = torch.randn(M, K)
                calls = max(5, int(2000 / M))
                res = {name: [] for name in cands}
                for _ in range(a.rounds):
                    for name, (copies, fn) in cands.items():
                        before = torch.ops.qc_cpu.set_isa(isa_of(name)) if isa_of(name) else None
                        res[name].append(time_round(x, copies, fn, calls))
                        if before is not None:
                            torch.ops.qc_cpu.set_isa(before)
                base = statistics.median(res["fp32 F.linear"])
                bf = statistics.median(res["bf16 F.linear"])
                for name, ts in res.items():
                    med = statistics.median(ts)
                    rows.append((shape, K, N, M, name, med, min(ts), max(ts), base / med, bf / med))
            del cands
    print("\n| shape (K×N) | M | kernel | µs median (min–max) | × vs fp32 | × vs bf16 |")
    print("|---|---|---|---|---|---|")
    for shape, K, N, M, name, med, lo, hi, r32, rbf in rows:
        print(f"| {shape} {K}×{N} | {M} | {name} | {med:.1f} ({lo:.1f}–{hi:.1f}) | {r32:.2f} | {rbf:.2f} |")
    med = {(r[0], r[3], r[4]): r[5] for r in rows}
    print("\n| one decoder layer's linears (W4A16 merged, as loaded) | M | fp32 µs | bf16 µs | W4A16 µs | × vs fp32 | × vs bf16 |")
    print("|---|---|---|---|---|---|---|")
    for M in a.ms:
        f32 = sum(med[(s, M, "fp32 F.linear")] for s in LAYER_FLOAT)
        b16 = sum(med[(s, M, "bf16 F.linear")] for s in LAYER_FLOAT)
        for kernel in [f"w4a16 ours ({n})" for n in ISA_NAMES.values()] + ["w4a16 torch int4pack"]:
            if (LAYER_LOWERED[0], M, kernel) in med:
                w4 = sum(med[(s, M, kernel)] for s in LAYER_LOWERED)
                print(f"| {kernel} | {M} | {f32:.0f} | {b16:.0f} | {w4:.0f} | {f32 / w4:.2f} | {b16 / w4:.2f} |")


if __name__ == "__main__":
    main()
