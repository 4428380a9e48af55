"""The W4A16 kernels compiled for a Hopper GPU without one: Triton's own compiler and ptxas
(bundled with the triton wheel) turn each form and tile into sm_90a SASS here on the CPU, and the
inner loop's instructions are counted. No timing: a static estimate of the issue work per weight.

Where a kernel is bound by instruction issue, that count predicts its time. The model: per SM
sub-partition, a warp instruction holds its pipe for 32 / (results per clock) cycles, with the
CUDA guide's figures for compute capability 9.0 (fp32 add/mul/fma 128 per SM and clock: 1 cycle;
32-bit integer add/logic/shift 64: 2; conversions 16: 8; shuffles 32: 4). Memory, tensor-core
and latency limits are left out, so it is a lower bound on cycles; the table's last column
checks it against the one form measured on a card.

    .venv/bin/python bench/kernel_sass.py            # table on stdout, JSON to $OUT/sass.json

The kernels are compiled as a launch would specialize them: unit strides as constants, the rest
divisible by 16, bf16 activations, int4 with zero points, group 128.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qcompiler.codegen import triton_gemv, triton_linear  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# cycles per warp instruction on one SM sub-partition (CUDA C++ guide, throughput table, cc 9.0)
# fp32, and packed 16-bit pairs (f16x2 / bf16x2: twice the results per instruction, same issue rate)
FP32 = {"FFMA", "FADD", "FMUL", "FSEL", "FMNMX", "HADD2", "HMUL2", "HFMA2", "HMNMX2"}
INT = {"LOP3", "SHF", "PRMT", "IMAD", "LEA", "IADD3", "VIADD", "ISETP", "SEL", "IMNMX", "VIMNMX", "SHL", "PLOP3"}
CYCLES = {"I2F": 8, "F2I": 8, "F2F": 8, "SHFL": 4}
GROUP = 128
# the card the one measurement came from: H200, 132 SMs, 1.98 GHz boost
SMS, CLOCK_GHZ = 132, 1.98
MEASURED = {("planes", 1): 47.1, ("planes", 4): 132.7, ("planes", 16): 50.6, ("planes", 64): 96.5,
            ("planes", 128): 161.1}  # us, 4096 x 11008, bench/RESULTS.md (GPU section, run 2)
BF16_US = 35.1  # cuBLAS bf16 on the same shape, same run

# (form, M, block_m, block_n, block_k, num_warps, num_stages)
CASES = [("planes", 1, 1, 128, 64, 4, 1), ("stream", 1, 1, 128, 64, 4, 1), ("stream", 1, 1, 64, 128, 4, 1),
         ("words", 1, 1, 128, 128, 4, 1), ("words", 1, 1, 128, 64, 4, 1),
         ("planes", 4, 4, 128, 64, 4, 1), ("stream", 4, 4, 256, 64, 8, 1), ("words", 4, 4, 256, 64, 8, 1),
         ("planes", 16, 16, 64, 128, 4, 3), ("swap", 16, 16, 128, 128, 8, 3), ("swap", 16, 16, 64, 128, 4, 3),
         ("planes", 64, 64, 64, 64, 4, 3), ("swap", 64, 64, 128, 128, 8, 3), ("swap", 64, 64, 128, 64, 8, 3),
         ("swap", 32, 32, 64, 128, 4, 3), ("swap", 32, 32, 128, 128, 8, 3),
         ("planes", 128, 128, 128, 64, 8, 3), ("swap", 128, 128, 128, 64, 8, 3), ("swap", 128, 128, 128, 128, 8, 3),
         ("words", 2, 2, 128, 128, 4, 1),
         # int8 per channel (W8A16): the byte stream at its rule tiles (BLOCK_K 32) and at BLOCK_K 64, the swapped tile
         ("stream8", 1, 1, 128, 32, 4, 1), ("stream8", 2, 2, 128, 32, 4, 1), ("stream8", 1, 1, 128, 64, 4, 1),
         ("stream8", 2, 2, 128, 64, 4, 1), ("stream8", 4, 4, 256, 32, 8, 1),
         ("swap8", 16, 16, 64, 128, 4, 3),
         # int8 g128 with zero points: the byte stream at the rule tile, and the swapped tile
         ("stream8g", 1, 1, 128, 32, 4, 1), ("stream8g", 2, 2, 128, 32, 4, 1), ("swap8g", 16, 16, 64, 128, 4, 3)]


def _signature(fn, consts: dict) -> tuple[dict, dict, dict]:
    ptrs = {"x_ptr": "*bf16", "w_ptr": "*u8", "s_ptr": "*bf16", "z_ptr": "*i8", "b_ptr": "*bf16", "out_ptr": "*bf16",
            "ws_ptr": "*fp32", "lock_ptr": "*i32"}
    ones = {"stride_xk", "stride_wk", "stride_sn", "stride_zn", "stride_on"}
    sig, attrs, consts = {}, {}, dict(consts)
    for i, name in enumerate(fn.arg_names):
        if name in ptrs:
            sig[name] = ptrs[name]
        elif name in ones:
            sig[name], consts[name] = "constexpr", 1
        elif name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
        if sig[name] != "constexpr" and (name in ptrs or name.startswith("stride") or name in ("N", "K", "k_per_split")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs, consts


def compile_case(form: str, block_m: int, block_n: int, block_k: int, warps: int, stages: int):
    common = dict(BITS=4, GROUP=GROUP, HAS_ZERO=True, HAS_BIAS=False, SPLIT=True, BLOCK_M=block_m, BLOCK_N=block_n,
                  BLOCK_K=block_k)
    w_ptr = "*u8"
    if form.endswith("8"):  # int8 codes, one scale per row, no zero points (W8A16's default)
        common.update(BITS=8, GROUP=4096, HAS_ZERO=False)
        w_ptr = "*i8"
    elif form.endswith("8g"):  # int8 codes in groups of 128 with zero points
        common.update(BITS=8)
        w_ptr = "*i8"
    if form in ("stream8", "stream8g"):
        fn, consts = triton_gemv._wq_gemv_stream_kernel, dict(common, X_PAIRS=False, PER_CHANNEL=form == "stream8")
    elif form in ("swap8", "swap8g"):
        fn, consts = triton_linear._wq_dot_swap_kernel, dict(common, EXP_MAGIC=0, EXP_BASE=0.0, DOT_PRECISION="tf32",
                                                             EVEN_K=True)
    elif form == "stream":
        fn, consts = triton_gemv._wq_gemv_stream_kernel, dict(common, X_PAIRS=True, PER_CHANNEL=False)
    elif form == "words":
        fn, consts = triton_gemv._w4_gemv_words_kernel, {k: v for k, v in common.items() if k != "BITS"}
    elif form == "swap":
        fn, consts = triton_linear._wq_dot_swap_kernel, dict(common, EXP_MAGIC=0x4300, EXP_BASE=128.0, DOT_PRECISION="tf32",
                                                             EVEN_K=True)
    else:
        fn, consts = triton_linear._wq_linear_kernel, dict(common, PER_CHANNEL=False, USE_DOT=block_m >= 16, DOT_PRECISION="tf32")
    sig, attrs, consts = _signature(fn, consts)
    sig["w_ptr"] = w_ptr
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=TARGET,
                          options=dict(num_warps=warps, num_stages=stages))


def _tool(name: str, *args: str, data: bytes | str, suffix: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=suffix, delete=False, mode="wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    try:
        r = subprocess.run([os.path.join(BIN, name), *args, f.name], capture_output=True, text=True)
        return r.stdout + r.stderr
    finally:
        os.unlink(f.name)


def resources(kernel) -> dict:
    out = _tool("ptxas", "--gpu-name", "sm_90a", "-v", "-o", os.devnull, data=kernel.asm["ptx"], suffix=".ptx")
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {"registers": int(regs.group(1)) if regs else None, "spill_bytes": int(spill.group(1)) if spill else None}


def inner_loop(kernel) -> list[str]:
    """Opcodes of the longest backward branch's body: the K loop."""
    sass = _tool("cuobjdump", "-sass", data=kernel.asm["cubin"], suffix=".cubin")
    rows = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,5})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\S*)\s*(.*)", line)
        if m:
            rows.append((int(m.group(1), 16), m.group(2), m.group(4)))
    best: list = []
    for addr, op, args in rows:
        t = re.search(r"0x([0-9a-f]+)", args) if op == "BRA" else None
        if t and int(t.group(1), 16) < addr:
            body = [o for a, o, _ in rows if int(t.group(1), 16) <= a <= addr]
            best = body if len(body) > len(best) else best
    return best


def issue_cycles(ops: list[str]) -> float:
    return sum(1 if o in FP32 else 2 if o in INT else CYCLES.get(o, 0) for o in ops)


def main() -> int:
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "out")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    print(f"sm_90a SASS, triton {triton.__version__}; 4096 x 11008 estimate at {SMS} SMs x {CLOCK_GHZ} GHz")
    print(f"{'form':7} {'M':>4} {'tile (m,n,k,warps,stages)':27} {'regs':>4} {'spill':>5} {'loop':>5} "
          f"{'cyc/32w':>7} {'est us':>7} {'measured':>8}  top opcodes")
    for form, M, bm, bn, bk, warps, stages in CASES:
        t0 = time.perf_counter()
        try:
            k = compile_case(form, bm, bn, bk, warps, stages)
        except Exception as e:  # a tile that does not compile is reported, not fatal
            print(f"{form:7} {M:4d} {(bm, bn, bk, warps, stages)!s:27} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        res, ops = resources(k), inner_loop(k)
        threads = 32 * warps
        weights_per_lane = bn * bk / threads  # weights each lane handles per loop trip
        # a warp's loop trip: 32 lanes x weights_per_lane weights for issue_cycles on one sub-partition
        cyc = issue_cycles(ops) / weights_per_lane if ops else float("nan")  # cycles per 32 weights
        est_us = 4096 * 11008 / (SMS * 4) / 32 * cyc / (CLOCK_GHZ * 1e3)
        counts: dict = {}
        for o in ops:
            counts[o] = counts.get(o, 0) + 1
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
        meas = MEASURED.get((form, M))  # the best tuned planes tile on the card, beside this tile's estimate
        rows.append({"form": form, "M": M, "tile": [bm, bn, bk, warps, stages], **res, "loop_instructions": len(ops),
                     "issue_cycles_per_32_weights": round(cyc, 2), "estimate_us_4096x11008": round(est_us, 1),
                     "measured_us": meas, "opcodes": counts, "compile_s": round(time.perf_counter() - t0, 1)})
        print(f"{form:7} {M:4d} {(bm, bn, bk, warps, stages)!s:27} {res['registers']!s:>4} {res['spill_bytes']!s:>5} "
              f"{len(ops):5d} {cyc:7.2f} {est_us:7.1f} {'' if meas is None else f'{meas:.1f}':>8}  "
              + " ".join(f"{o}:{n}" for o, n in top), flush=True)
    best = {}
    for r in rows:
        if not r["spill_bytes"]:
            key = (r["form"], r["M"])
            best[key] = min(best.get(key, float("inf")), r["estimate_us_4096x11008"])
    print(f"\nbest estimate per form and M (no spills), us, and vs cuBLAS bf16's measured {BF16_US} us:")
    for M in sorted({m for _, m in best}):
        cells = [f"{f} {best[(f, M)]:.1f} ({BF16_US / best[(f, M)]:.2f}x)" for f in ("planes", "stream", "words", "swap")
                 if (f, M) in best]
        print(f"  M={M:<4d} " + "   ".join(cells))
    with open(os.path.join(out_dir, "sass.json"), "w") as f:
        json.dump({"target": "sm_90a", "triton": triton.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
