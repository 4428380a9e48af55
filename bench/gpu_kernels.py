"""Our Triton kernels beside their anchors on one lent GPU, in one run of about a minute or two.

    OUT=bench/out python3 bench/gpu_kernels.py [--only w4a16,attention] [--budget 120]
    .venv/bin/python bench/gpu_kernels.py --smoke     # CPU, Triton interpreter, tiny shapes: plumbing only

Sections, each beside its anchor in the same process on the same data:
  copy       device-to-device copy, the memory ceiling
  w4a16      W4A16 g128 (asymmetric with zeros, and symmetric) vs cuBLAS bf16 ``F.linear`` and tinygemm
             (``torch._weight_int4pack_mm``, group 128) at M = 1..1024; Llama-2-7B and Llama-3-70B shapes
  w8a16      W8A16 per-channel vs bf16 at M = 1, 16
  w8a8       W8A8 (per-token activation quantization included) vs the same in plain torch around
             ``torch._int_mm``, and the raw ``torch._int_mm``
  fp8        FP8 e4m3 (activation quantization included) vs plain torch around ``torch._scaled_mm``
             (rowwise scales when supported), and the raw ``torch._scaled_mm``
  attention  paged decode attention (random block tables, with holes) vs SDPA over a contiguous cache
Every kernel is checked once per shape against a float reference, so a wrong kernel cannot post a
fast number unnoticed.

Method: triton ``do_bench`` (warmup 10 ms, rep 40 ms, median; it also clears L2 before each
call), weights rotated through enough copies to exceed the L2 (each candidate its own), so the
figures are HBM figures. Groups of sections run in child processes
under a shared time budget (deadlines, unused time rolls over): a kernel that faults poisons only
its own process's CUDA context. Rows print as they come; ``$OUT/kernels.json`` and
``$OUT/kernels.md`` (a table for RESULTS.md) are rewritten after each group. ``$OUT`` defaults to
``bench/out``. qcompiler is imported as installed (``pip install --no-deps -e .``; ``bench/gpu.sh``
installs it first).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# process -> [(section, share of the time budget)]
GROUPS = {"linear": [("copy", 2), ("w4a16", 55), ("w8a16", 10)],
          "act_quant": [("w8a8", 18), ("fp8", 15)],
          "attention": [("attention", 25)]}
WARMUP_MS, REP_MS = 10, 40
HOST_WARN_US = 50
GRACE_S = 10  # past its deadline a child may finish a compile or a row before it is killed

SMOKE = "--smoke" in sys.argv
DEV = "cpu" if SMOKE else "cuda"
GROUP = 128 if not SMOKE else 64
W4_SHAPES = [(4096, 11008), (11008, 4096), (8192, 28672)] if not SMOKE else [(256, 128)]
W4_MS = [1, 4, 16, 64, 128, 256, 1024] if not SMOKE else [1, 16, 64]
W8_MS = [1, 16]
ACT_SHAPES = [(4096, 11008), (8192, 28672)] if not SMOKE else [(256, 128)]
ACT_MS = [16, 64, 256] if not SMOKE else [16]
HEADS, HEAD_DIM, BLOCK = (32, 128, 16) if not SMOKE else (4, 32, 16)
# (kv heads, batch, context tokens)
ATTN_CASES = ([(32, 1, 4096), (32, 32, 2048), (32, 64, 1024), (8, 32, 2048)] if not SMOKE
              else [(4, 1, 64), (2, 2, 48)])
CHECK_M = 16
# NOTE: the Triton interpreter on CPU mishandles bf16 (garbage out): the smoke run uses fp16 instead
ACT_DTYPE = "bfloat16" if not SMOKE else "float16"


# --- child process: one group of sections --------------------------------------------------

class Ctx:
    """One section's output: records appended to the rows file (flushed), lines printed."""

    def __init__(self, section: str, rows_path: str, deadline: float):
        self.section, self.rows_path, self.deadline = section, rows_path, deadline
        self.skipped = False

    def emit(self, kind: str, **rec) -> None:
        rec = {"type": kind, "section": self.section, **rec}
        with open(self.rows_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def note(self, text: str) -> None:
        print(f"[{self.section}] {text}", flush=True)
        self.emit("note", text=text)

    def header(self, title: str, columns: list[str]) -> None:
        print(f"\n## {title}", flush=True)
        self.emit("header", title=title, columns=columns)

    def row(self, line: str, cells: list[str], **data) -> None:
        print(line, flush=True)
        self.emit("row", cells=cells, **data)

    def check(self, what: str, err: float, tol: float, kind: str = "max |err| / max |ref|") -> bool:
        ok = bool(err <= tol)
        print(f"  check {what}: {kind} = {err:.2e} (tol {tol:.0e}) {'ok' if ok else 'FAILED'}", flush=True)
        self.emit("check", what=what, err=err, tol=tol, metric=kind, ok=ok)
        return ok

    def out_of_time(self, need_s: float = 1.0) -> bool:
        if time.time() + need_s <= self.deadline:
            return False
        if not self.skipped:
            self.skipped = True
            self.note("time budget spent: the remaining rows of this section are skipped")
        return True

    def guard(self, label: str, fn, default=None):
        """``fn()``, or ``default`` after one line and a short traceback. A sticky CUDA error
        (the context is gone) re-raises: nothing else in this process can run."""
        try:
            return fn()
        except Exception as e:
            print(f"  [{self.section}] {label} failed: {one_line(e)}\n{short_tb(e)}", flush=True)
            self.emit("failure", what=label, error=one_line(e))
            if DEV == "cuda":
                import torch
                try:
                    torch.cuda.synchronize()
                except Exception:
                    raise e
            return default

    def time_us(self, label: str, fn):
        return self.guard(label, lambda: bench_ms(fn) * 1e3)

    def host_us(self, label: str, fn, n: int = 50 if not SMOKE else 2):
        """Host time to enqueue one call (no sync inside). do_bench clears L2 with a 256 MB memset
        before each timed call, which hides up to ~70 µs of launch overhead; past that the GPU
        waits for the host and the timed figure includes the wait."""
        def run():
            fn()
            if DEV == "cuda":
                import torch
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            t = (time.perf_counter() - t0) / n * 1e6
            if DEV == "cuda":
                torch.cuda.synchronize()
            if t > HOST_WARN_US and not SMOKE:
                self.note(f"{label}: {t:.0f} µs of host time per call: launch overhead may show in its µs figure")
            return t
        return self.guard(f"host time {label}", run)


def one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def short_tb(e: BaseException, frames: int = 2) -> str:
    """The innermost ``frames`` frames, without the (possibly very long) message."""
    return "".join(traceback.format_list(traceback.extract_tb(e.__traceback__)[-frames:])).rstrip()


def bench_ms(fn) -> float:
    if SMOKE:  # the interpreter's figures mean nothing: two calls, wall time
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


L2_BYTES = 60 * 2 ** 20


def rotating(make, nbytes_each: int) -> list:
    copies = max(2, min(64, int(4 * L2_BYTES // max(nbytes_each, 1)) + 1))
    return [make() for _ in range(copies)]


def cycle_call(items, f):
    state = {"i": 0}

    def run():
        i = state["i"]
        state["i"] = (i + 1) % len(items)
        return f(items[i])
    return run


def n_contig(t):
    """The runtime's layout for scales and zeros: ``[N, groups]`` stored N-contiguous."""
    return t.t().contiguous().t()


def rel_err(y, ref) -> float:
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def us(t) -> str:
    return "–" if t is None else f"{t:.1f}"


def ratio(num, den) -> str:
    return "–" if num is None or den is None else f"{num / den:.2f}×"


def tbps(nbytes: int, t_us):
    return None if t_us is None else nbytes / (t_us * 1e-6) / 1e12


def f2(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def free(*_):
    import torch
    if DEV == "cuda":
        torch.cuda.empty_cache()


# --- sections ---------------------------------------------------------------------------

def sec_copy(ctx):
    import torch
    n = 2 ** 29 if not SMOKE else 2 ** 16
    a = torch.empty(n, dtype=torch.bfloat16, device=DEV).normal_()
    b = torch.empty_like(a)
    t = bench_ms(lambda: b.copy_(a)) * 1e3
    rate = 2 * n * 2 / (t * 1e-6) / 1e12
    ctx.note(f"device-to-device copy: {rate:.2f} TB/s (read + write, {2 * n * 2 / 2**30:.0f} GiB moved per call)")
    ctx.emit("copy", TBps=rate)


def dequant_int4(q, s, z, group: int):
    """float64 ``[N, K]`` from the artifact layout (two offset-binary nibbles per byte, column 2j low)."""
    import torch
    N = q.shape[0]
    w = torch.stack([q & 0xF, q >> 4], -1).reshape(N, -1).double() - 8
    if z is not None:
        w = w - z.double().repeat_interleave(group, 1)
    return w * s.double().repeat_interleave(group, 1)


def sec_w4a16(ctx):
    import torch
    import torch.nn.functional as F
    from qcompiler.codegen.triton_linear import w4a16_linear_triton as ours
    bf = getattr(torch, ACT_DTYPE)
    ctx.header(f"W4A16 g{GROUP} (ours, Triton) vs bf16 cuBLAS `F.linear` and tinygemm `torch._weight_int4pack_mm`",
               ["K×N", "M", "ours asym µs", "ours sym µs", "bf16 µs", "tinygemm µs", "asym vs bf16", "sym vs bf16",
                "asym vs tinygemm", "asym weight TB/s", "sym weight TB/s"])
    for K, N in W4_SHAPES:
        if ctx.out_of_time(5):
            return
        ng = K // GROUP

        def make():
            q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=DEV)
            s = (torch.rand(N, ng, device=DEV) * 0.02 + 0.005).to(bf)
            z = torch.randint(-8, 8, (N, ng), dtype=torch.int8, device=DEV)
            return q, n_contig(s), n_contig(z)

        bytes_sym = N * K // 2 + N * ng * 2          # packed weights + bf16 scales
        bytes_asym = bytes_sym + N * ng              # + int8 zeros
        ws = rotating(make, bytes_asym)
        q, s, z = ws[0]
        x = torch.randn(CHECK_M, K, device=DEV, dtype=bf)
        good = {}
        for name, zz in (("asym", z), ("sym", None)):
            good[name] = ctx.guard(f"check {name} {K}×{N}", lambda: ctx.check(
                f"w4a16 {name} {K}×{N} M={CHECK_M}", rel_err(ours(x, q, s, zz, None), x.double() @ dequant_int4(q, s, zz, GROUP).t()),
                1e-2), default=False)
        bfs = rotating(lambda: torch.randn(N, K, device=DEV, dtype=bf), N * K * 2)

        def make_tg():
            w = torch.randint(0, 16, (N, K), device=DEV, dtype=torch.int32)
            w8 = (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8)
            return torch._convert_weight_to_int4pack(w8, 8)
        tgs = ctx.guard("tinygemm packing", lambda: rotating(make_tg, N * K // 2))
        sz = torch.rand(ng, N, 2, device=DEV, dtype=bf)
        for M in W4_MS:
            if ctx.out_of_time(1):
                return
            x = torch.randn(M, K, device=DEV, dtype=bf)
            t = {"asym": ctx.time_us(f"ours asym M={M}", cycle_call(ws, lambda w: ours(x, w[0], w[1], w[2], None))),
                 "sym": ctx.time_us(f"ours sym M={M}", cycle_call(ws, lambda w: ours(x, w[0], w[1], None, None))),
                 "bf16": ctx.time_us(f"bf16 M={M}", cycle_call(bfs, lambda w: F.linear(x, w))),
                 "tinygemm": ctx.time_us(f"tinygemm M={M}", cycle_call(
                     tgs, lambda w: torch._weight_int4pack_mm(x, w, GROUP, sz))) if tgs else None}
            host = ctx.host_us(f"w4a16 asym {K}×{N} M={M}", cycle_call(ws, lambda w: ours(x, w[0], w[1], w[2], None)))
            bw = {"asym": tbps(bytes_asym, t["asym"]), "sym": tbps(bytes_sym, t["sym"])}
            mark = {k: "" if good[k] else " (wrong)" for k in good}
            ctx.row(f"w4a16 {K:5d}×{N:<5d} M={M:<4d} ours asym {us(t['asym']):>7}{mark['asym']} sym {us(t['sym']):>7}"
                    f"{mark['sym']} | bf16 {us(t['bf16']):>7} tinygemm {us(t['tinygemm']):>7} µs | vs bf16: asym "
                    f"{ratio(t['bf16'], t['asym'])} sym {ratio(t['bf16'], t['sym'])} | vs tinygemm "
                    f"{ratio(t['tinygemm'], t['asym'])} | weight TB/s asym {f2(bw['asym'])} sym {f2(bw['sym'])}",
                    [f"{K}×{N}", str(M), us(t["asym"]) + mark["asym"], us(t["sym"]) + mark["sym"], us(t["bf16"]),
                     us(t["tinygemm"]), ratio(t["bf16"], t["asym"]), ratio(t["bf16"], t["sym"]),
                     ratio(t["tinygemm"], t["asym"]), f2(bw["asym"]), f2(bw["sym"])],
                    K=K, N=N, M=M, us=t, weight_TBps=bw, weight_bytes={"asym": bytes_asym, "sym": bytes_sym},
                    speedup_vs_bf16={k: (t["bf16"] / t[k] if t[k] and t["bf16"] else None) for k in ("asym", "sym")},
                    host_us_per_call=host, checked_ok=good)
        del ws, bfs, tgs, q, s, z
        free()


def sec_w8a16(ctx):
    import torch
    import torch.nn.functional as F
    from qcompiler.codegen.triton_linear import w8a16_linear_triton as ours
    bf = getattr(torch, ACT_DTYPE)
    ctx.header("W8A16 per-channel (ours, Triton) vs bf16 cuBLAS `F.linear`",
               ["K×N", "M", "ours µs", "bf16 µs", "vs bf16", "weight TB/s"])
    for K, N in W4_SHAPES[:2]:
        if ctx.out_of_time(3):
            return

        def make():
            return (torch.randint(-128, 128, (N, K), dtype=torch.int8, device=DEV),
                    (torch.rand(N, 1, device=DEV) * 0.01 + 0.001).to(bf))
        nbytes = N * K + N * 2
        ws = rotating(make, nbytes)
        q, s = ws[0]
        x = torch.randn(CHECK_M, K, device=DEV, dtype=bf)
        good = ctx.guard(f"check {K}×{N}", lambda: ctx.check(
            f"w8a16 {K}×{N} M={CHECK_M}", rel_err(ours(x, q, s, None, None), x.double() @ (q.double() * s.double()).t()),
            1e-2), default=False)
        bfs = rotating(lambda: torch.randn(N, K, device=DEV, dtype=bf), N * K * 2)
        for M in W8_MS:
            if ctx.out_of_time(1):
                return
            x = torch.randn(M, K, device=DEV, dtype=bf)
            t = {"ours": ctx.time_us(f"ours M={M}", cycle_call(ws, lambda w: ours(x, w[0], w[1], None, None))),
                 "bf16": ctx.time_us(f"bf16 M={M}", cycle_call(bfs, lambda w: F.linear(x, w)))}
            host = ctx.host_us(f"w8a16 {K}×{N} M={M}", cycle_call(ws, lambda w: ours(x, w[0], w[1], None, None)))
            mark = "" if good else " (wrong)"
            bw = tbps(nbytes, t["ours"])
            ctx.row(f"w8a16 {K:5d}×{N:<5d} M={M:<4d} ours {us(t['ours'])}{mark} bf16 {us(t['bf16'])} µs | vs bf16 "
                    f"{ratio(t['bf16'], t['ours'])} | weight {f2(bw)} TB/s",
                    [f"{K}×{N}", str(M), us(t["ours"]) + mark, us(t["bf16"]), ratio(t["bf16"], t["ours"]), f2(bw)],
                    K=K, N=N, M=M, us=t, weight_TBps=bw, host_us_per_call=host, checked_ok=good)
        del ws, bfs, q, s
        free()


TINY = 1.1754943508222875e-38


def torch_w8a8(x, q, ws):
    """Per-token int8 quantization in plain torch, ``torch._int_mm``, rescale: the fair anchor."""
    import torch
    s = (x.abs().amax(-1, keepdim=True).float() / 127).clamp_min(TINY)
    xq = torch.round(x.float() / s).clamp(-127, 127).to(torch.int8)
    return (torch._int_mm(xq, q.t()).float() * s * ws.view(1, -1)).to(torch.bfloat16)


def sec_w8a8(ctx):
    import torch
    from qcompiler.codegen.triton_scaled_mm import w8a8_linear_triton as ours
    bf = getattr(torch, ACT_DTYPE)
    ctx.header("W8A8 int8 (ours, Triton, per-token activation quantization included) vs plain torch quantization + "
               "`torch._int_mm`, and the raw `torch._int_mm` (int8 operands given; needs M > 16: M = 32 there)",
               ["K×N", "M", "ours µs", "torch quant + _int_mm µs", "raw _int_mm µs", "vs torch", "vs raw _int_mm"])
    for K, N in ACT_SHAPES:
        if ctx.out_of_time(3):
            return

        def make():
            return (torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEV),
                    torch.rand(N, 1, device=DEV) * 0.002 + 0.0005)
        ws = rotating(make, N * K + N * 4)
        q, wsc = ws[0]

        def check():
            x = torch.randn(CHECK_M, K, device=DEV, dtype=bf)
            s = (x.abs().amax(-1, keepdim=True).float() / 127).clamp_min(TINY)
            xq = torch.round(x.float() / s).clamp(-127, 127)
            ref = (xq.double() @ q.double().t()) * s.double() * wsc.double().view(1, -1)
            return ctx.check(f"w8a8 {K}×{N} M={CHECK_M}", rel_err(ours(x, q, wsc, None, None), ref), 1e-2)
        good = ctx.guard(f"check {K}×{N}", check, default=False)
        for M in ACT_MS:
            if ctx.out_of_time(1):
                return
            Mi = max(M, 32) if not SMOKE else M
            x = torch.randn(M, K, device=DEV, dtype=bf)
            xi = x if Mi == M else torch.randn(Mi, K, device=DEV, dtype=bf)
            xq = torch.randint(-127, 128, (Mi, K), dtype=torch.int8, device=DEV)
            t = {"ours": ctx.time_us(f"ours M={M}", cycle_call(ws, lambda w: ours(x, w[0], w[1], None, None))),
                 "torch": ctx.time_us(f"torch quant + _int_mm M={Mi}", cycle_call(ws, lambda w: torch_w8a8(xi, w[0], w[1]))),
                 "raw_int_mm": ctx.time_us(f"_int_mm M={Mi}", cycle_call(ws, lambda w: torch._int_mm(xq, w[0].t())))}
            host = ctx.host_us(f"w8a8 {K}×{N} M={M}", cycle_call(ws, lambda w: ours(x, w[0], w[1], None, None)))
            mark = "" if good else " (wrong)"
            mi = "" if Mi == M else f" (M={Mi})"
            ctx.row(f"w8a8  {K:5d}×{N:<5d} M={M:<4d} ours {us(t['ours'])}{mark} | torch quant+_int_mm{mi} "
                    f"{us(t['torch'])} raw _int_mm{mi} {us(t['raw_int_mm'])} µs | ours vs torch {ratio(t['torch'], t['ours'])}"
                    f" vs raw {ratio(t['raw_int_mm'], t['ours'])}",
                    [f"{K}×{N}", str(M), us(t["ours"]) + mark, us(t["torch"]) + mi, us(t["raw_int_mm"]) + mi,
                     ratio(t["torch"], t["ours"]), ratio(t["raw_int_mm"], t["ours"])],
                    K=K, N=N, M=M, anchor_M=Mi, us=t, host_us_per_call=host, checked_ok=good)
        del ws, q, wsc
        free()


FP8_MAX = 448.0


def scaled_mm_mode(K: int, N: int) -> str:
    import torch
    fp8 = torch.float8_e4m3fn
    a = torch.randn(16, K, device=DEV).to(fp8)
    b = torch.randn(N, K, device=DEV).to(fp8)
    try:
        torch._scaled_mm(a, b.t(), scale_a=torch.ones(16, 1, device=DEV), scale_b=torch.ones(1, N, device=DEV),
                         out_dtype=torch.bfloat16)
        if DEV == "cuda":
            torch.cuda.synchronize()
        return "rowwise"
    except Exception as e:
        print(f"  rowwise _scaled_mm unsupported ({type(e).__name__}: {str(e)[:200]}): tensor-wise", flush=True)
        return "tensorwise"


def torch_fp8(x, q, ws, mode: str, one):
    """Activation quantization in plain torch, then ``torch._scaled_mm``: per-token x per-channel
    scales when rowwise is supported; else one scale each and the weight scales applied after."""
    import torch
    fp8 = torch.float8_e4m3fn
    if mode == "rowwise":
        s = (x.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp_min(TINY)
        xq = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(fp8)
        return torch._scaled_mm(xq, q.t(), scale_a=s, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16)
    s = (x.abs().amax().float() / FP8_MAX).clamp_min(TINY)
    xq = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(fp8)
    return (torch._scaled_mm(xq, q.t(), scale_a=s, scale_b=one, out_dtype=torch.bfloat16) * ws.view(1, -1)).to(torch.bfloat16)


def sec_fp8(ctx):
    import torch
    from qcompiler.codegen.triton_scaled_mm import fp8_linear_triton as ours
    bf, fp8 = getattr(torch, ACT_DTYPE), torch.float8_e4m3fn
    one = torch.tensor(1.0, device=DEV)
    mode = scaled_mm_mode(*ACT_SHAPES[0])
    ctx.note(f"torch._scaled_mm anchor uses {mode} scales")
    ctx.header(f"FP8 e4m3 (ours, Triton, per-token activation quantization included) vs plain torch quantization + "
               f"`torch._scaled_mm` ({mode} scales), and the raw `torch._scaled_mm` (fp8 operands given)",
               ["K×N", "M", "ours µs", "torch quant + _scaled_mm µs", "raw _scaled_mm µs", "vs torch", "vs raw _scaled_mm"])
    for K, N in ACT_SHAPES:
        if ctx.out_of_time(3):
            return

        def make():
            w = torch.randn(N, K, device=DEV) * 0.02
            s = (w.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(TINY)
            return (w / s).clamp(-FP8_MAX, FP8_MAX).to(fp8), s
        ws = rotating(make, N * K + N * 4)
        q, wsc = ws[0]

        def check():
            x = torch.randn(CHECK_M, K, device=DEV, dtype=bf)
            s = (x.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp_min(TINY)
            xq = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(fp8)
            ref = (xq.double() * s.double()) @ (q.double() * wsc.double()).t()
            return ctx.check(f"fp8 {K}×{N} M={CHECK_M}", rel_err(ours(x, q, wsc, None), ref), 2e-2)
        good = ctx.guard(f"check {K}×{N}", check, default=False)
        for M in ACT_MS:
            if ctx.out_of_time(1):
                return
            x = torch.randn(M, K, device=DEV, dtype=bf)
            xq = torch.randn(M, K, device=DEV).to(fp8)
            sa = torch.rand(M, 1, device=DEV) if mode == "rowwise" else one
            t = {"ours": ctx.time_us(f"ours M={M}", cycle_call(ws, lambda w: ours(x, w[0], w[1], None))),
                 "torch": ctx.time_us(f"torch quant + _scaled_mm M={M}",
                                      cycle_call(ws, lambda w: torch_fp8(x, w[0], w[1], mode, one))),
                 "raw_scaled_mm": ctx.time_us(f"_scaled_mm M={M}", cycle_call(ws, lambda w: torch._scaled_mm(
                     xq, w[0].t(), scale_a=sa, scale_b=w[1].view(1, -1) if mode == "rowwise" else one,
                     out_dtype=torch.bfloat16)))}
            host = ctx.host_us(f"fp8 {K}×{N} M={M}", cycle_call(ws, lambda w: ours(x, w[0], w[1], None)))
            mark = "" if good else " (wrong)"
            ctx.row(f"fp8   {K:5d}×{N:<5d} M={M:<4d} ours {us(t['ours'])}{mark} | torch quant+_scaled_mm "
                    f"{us(t['torch'])} raw _scaled_mm {us(t['raw_scaled_mm'])} µs | ours vs torch "
                    f"{ratio(t['torch'], t['ours'])} vs raw {ratio(t['raw_scaled_mm'], t['ours'])}",
                    [f"{K}×{N}", str(M), us(t["ours"]) + mark, us(t["torch"]), us(t["raw_scaled_mm"]),
                     ratio(t["torch"], t["ours"]), ratio(t["raw_scaled_mm"], t["ours"])],
                    K=K, N=N, M=M, us=t, scaled_mm_scales=mode, host_us_per_call=host, checked_ok=good)
        del ws, q, wsc
        free()


def sec_attention(ctx):
    import torch
    import torch.nn.functional as F
    from qcompiler.codegen.triton_attention import paged_attention_triton as ours
    bf = getattr(torch, ACT_DTYPE)
    H, D = HEADS, HEAD_DIM
    ctx.header(f"Paged decode attention (ours, Triton; block {BLOCK}, block tables a random permutation with holes) "
               f"vs SDPA over a contiguous cache; bf16, {H} query heads × {D}",
               ["heads q/kv", "B", "T", "ours µs", "SDPA µs", "ours KV TB/s", "SDPA KV TB/s", "ours % of SDPA"])
    for Hkv, B, T in ATTN_CASES:
        if ctx.out_of_time(3):
            return
        nb = T // BLOCK
        used = B * nb
        num_blocks = used + used // 4 + 1
        blocks = torch.randperm(num_blocks, device=DEV)[:used]
        block_tables = blocks.view(B, nb).to(torch.int64)
        k = torch.randn(B, Hkv, T, D, device=DEV, dtype=bf)
        v = torch.randn_like(k)
        q = torch.randn(B, H, 1, D, device=DEV, dtype=bf)
        cache = torch.zeros(1, 2, num_blocks, BLOCK, Hkv, D, device=DEV, dtype=bf)
        cache[0, 0, blocks] = k.transpose(1, 2).reshape(used, BLOCK, Hkv, D)
        cache[0, 1, blocks] = v.transpose(1, 2).reshape(used, BLOCK, Hkv, D)
        query = q.view(B, H, D)
        seq_lens = torch.full((B,), T, dtype=torch.int64, device=DEV)
        qsl = torch.arange(B + 1, dtype=torch.int64, device=DEV)
        scale = D ** -0.5
        gqa = Hkv != H

        def sdpa():
            if gqa:
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return F.scaled_dot_product_attention(q, k, v)

        def paged():
            return ours(query, cache, 0, block_tables, seq_lens, qsl, scale)

        def check():
            err = (paged().double() - sdpa().squeeze(2).double()).abs().max().item()
            return ctx.check(f"attention {H}/{Hkv} heads B={B} T={T} vs SDPA", err, 2e-2, kind="max |err|")
        good = ctx.guard(f"check B={B} T={T}", check, default=False)
        t = {"ours": ctx.time_us(f"ours B={B} T={T}", paged), "sdpa": ctx.time_us(f"SDPA B={B} T={T}", sdpa)}
        host = ctx.host_us(f"attention {H}/{Hkv} B={B} T={T}", paged)
        nbytes = 2 * B * T * Hkv * D * 2
        bw = {k_: tbps(nbytes, t[k_]) for k_ in t}
        pct = None if t["ours"] is None or t["sdpa"] is None else 100 * t["sdpa"] / t["ours"]
        mark = "" if good else " (wrong)"
        ctx.row(f"attention heads {H}/{Hkv} B={B:<3d} T={T:<5d} ours {us(t['ours'])}{mark} SDPA {us(t['sdpa'])} µs | KV TB/s "
                f"ours {f2(bw['ours'])} SDPA {f2(bw['sdpa'])} | ours {'–' if pct is None else f'{pct:.0f}'}% of SDPA",
                [f"{H}/{Hkv}", str(B), str(T), us(t["ours"]) + mark, us(t["sdpa"]), f2(bw["ours"]), f2(bw["sdpa"]),
                 "–" if pct is None else f"{pct:.0f}%"],
                heads=H, kv_heads=Hkv, B=B, T=T, us=t, kv_bytes=nbytes, kv_TBps=bw, pct_of_sdpa=pct, host_us_per_call=host,
                checked_ok=good)
        del k, v, q, cache, query, block_tables
        free()


SECTIONS = {"copy": sec_copy, "w4a16": sec_w4a16, "w8a16": sec_w8a16, "w8a8": sec_w8a8, "fp8": sec_fp8,
            "attention": sec_attention}


def child(group: str, rows_path: str, deadline: float, only) -> int:
    global L2_BYTES
    import torch
    torch.manual_seed(0)
    if DEV == "cuda":
        L2_BYTES = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", L2_BYTES) or L2_BYTES
    else:
        L2_BYTES = 2 ** 16
    plan = [(s, share) for s, share in GROUPS[group] if only is None or s in only]
    for i, (section, share) in enumerate(plan):
        ctx = Ctx(section, rows_path, deadline)
        left = deadline - time.time()
        if left < 3:
            ctx.note("no time left: section skipped")
            continue
        # this section's share of what is left; what it does not use rolls over to the next
        ctx.deadline = time.time() + left * share / sum(sh for _, sh in plan[i:])
        t0 = time.time()
        try:
            from qcompiler.codegen.workspace import SplitKWorkspace
            with SplitKWorkspace():  # the split-K GEMMs' buffers, held as a runner holds them
                SECTIONS[section](ctx)
            status = "ok" if not ctx.skipped else "partial: time budget spent"
        except Exception as e:
            status = f"failed: {one_line(e)}"
            print(f"[{section}] {status}\n{short_tb(e, 3)}", flush=True)
        ctx.emit("section", status=status, seconds=round(time.time() - t0, 1))
        print(f"[{section}] {status} in {time.time() - t0:.1f} s", flush=True)
        if status.startswith("failed") and DEV == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception:
                print(f"[{group}] the CUDA context is broken: this process stops here", flush=True)
                return 2
    return 0


# --- parent: schedule the groups, write the results -------------------------------------

def collect_info() -> dict:
    import torch
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "cuda": torch.version.cuda}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:
        info["triton"] = f"unavailable ({type(e).__name__})"
    if DEV == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sms=p.multi_processor_count, l2_bytes=getattr(p, "L2_cache_size", None),
                    memory_GiB=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
    else:
        info["device"] = "CPU (smoke run: Triton interpreter, tiny shapes, timings meaningless)"
    return info


def read_records(path: str) -> list:
    recs = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    recs.append(json.loads(line))
                except ValueError:
                    pass  # a line cut short by a killed child
    except FileNotFoundError:
        pass
    return recs


def markdown(info: dict, groups: dict, recs: list) -> str:
    copy = [r["TBps"] for r in recs if r["type"] == "copy"]
    out = [f"## GPU kernels: ours beside the anchors ({info.get('device')}, torch {info.get('torch')}, "
           f"triton {info.get('triton')}, CUDA {info.get('cuda')}, {info.get('date')})", "",
           "`bench/gpu_kernels.py`, one run: each kernel beside its anchor in the same process; triton `do_bench` "
           f"(warmup {WARMUP_MS} ms, rep {REP_MS} ms, median, L2 cleared before each call), weights rotated through "
           f"copies past the {(info.get('l2_bytes') or 0) / 2**20:.0f} MiB L2 (each candidate its own), so these are "
           "HBM figures. Scales and zeros N-contiguous, as the runtime stores them. \"vs X\" = X's time / ours "
           "(above 1: ours is faster). Weight TB/s counts packed weights + scales (+ zeros)."
           + (f" Device-to-device copy: {copy[0]:.2f} TB/s (read + write)." if copy else ""), ""]
    headers = {}
    for r in recs:
        if r["type"] == "header":
            headers[r["section"]] = r
    for section in [s for g in GROUPS.values() for s, _ in g]:
        rows = [r for r in recs if r["type"] == "row" and r["section"] == section]
        h = headers.get(section)
        if not h or not rows:
            continue
        out += [f"### {h['title']}", "", "| " + " | ".join(h["columns"]) + " |",
                "|" + "---|" * len(h["columns"])]
        out += ["| " + " | ".join(r["cells"]) + " |" for r in rows]
        out.append("")
    checks = [r for r in recs if r["type"] == "check"]
    if checks:
        out += ["Correctness, once per shape (against a float64 reference; attention against SDPA on the same data):", ""]
        out += [f"- {c['what']}: {c['metric']} {c['err']:.1e} (tol {c['tol']:.0e}) {'ok' if c['ok'] else '**FAILED**'}"
                for c in checks]
        out.append("")
    notes = [f"- {r['section']}: {r['text']}" for r in recs if r["type"] == "note" and "copy:" not in r["text"]]
    notes += [f"- {r['section']}: {r['what']} failed: {r['error'][:200]}" for r in recs if r["type"] == "failure"]
    notes += [f"- {r['section']}: {r['status']}" for r in recs if r["type"] == "section" and r["status"] != "ok"]
    notes += [f"- process {g}: {v['status']}" for g, v in groups.items() if v["status"] != "ok"]
    if notes:
        out += ["Notes:", ""] + notes + [""]
    return "\n".join(out)


def write_results(out: Path, info: dict, groups: dict, recs: list) -> None:
    res = {"info": info, "method": {"do_bench": {"warmup_ms": WARMUP_MS, "rep_ms": REP_MS, "return_mode": "median"},
                                    "weights_rotated_past_l2": True},
           "processes": groups, "copy_TBps": next((r["TBps"] for r in recs if r["type"] == "copy"), None)}
    for kind in ("row", "check", "note", "failure", "section"):
        res[kind + "s"] = [{k: v for k, v in r.items() if k not in ("type", "cells")} for r in recs if r["type"] == kind]
    (out / "kernels.json").write_text(json.dumps(res, indent=1))
    (out / "kernels.md").write_text(markdown(info, groups, recs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--budget", type=float, default=120.0, help="seconds for all sections together")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes: plumbing only")
    ap.add_argument("--group", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    if args.group:
        return child(args.group, args.rows, args.deadline, only)

    t0 = time.time()
    try:
        import torch
    except ImportError:
        print("gpu_kernels.py needs torch: nothing measured", flush=True)
        return 1
    if not SMOKE and not torch.cuda.is_available():
        print("gpu_kernels.py needs a CUDA device (none found): nothing measured", flush=True)
        return 1
    info = collect_info()
    print(f"{info['device']} | torch {info['torch']} | triton {info['triton']} | CUDA {info['cuda']} | "
          f"python {info['python']} | {info['date']}", flush=True)
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "out")
    out.mkdir(parents=True, exist_ok=True)
    fd, rows_path = tempfile.mkstemp(prefix="gpu_kernels_", suffix=".jsonl")
    os.close(fd)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if SMOKE:
        env["TRITON_INTERPRET"] = "1"
    groups = {}
    plan = [(g, secs) for g, secs in GROUPS.items() if only is None or any(s in only for s, _ in secs)]
    shares = [sum(sh for s, sh in secs if only is None or s in only) for _, secs in plan]
    write_results(out, info, groups, [])
    for i, (group, _) in enumerate(plan):
        now = time.time()
        # the group's deadline: its cumulative share of the budget, so unused time rolls over
        deadline = t0 + args.budget * sum(shares[:i + 1]) / sum(shares)
        if deadline - now < 5:
            groups[group] = {"status": "skipped: no time left", "seconds": 0}
            print(f"[{group}] skipped: no time left", flush=True)
            continue
        cmd = [sys.executable, "-u", __file__, "--group", group, "--rows", rows_path, "--deadline", f"{deadline:.2f}"]
        cmd += (["--only", args.only] if args.only else []) + (["--smoke"] if SMOKE else [])
        try:
            rc = subprocess.run(cmd, env=env, timeout=deadline - now + GRACE_S).returncode
            status = "ok" if rc == 0 else f"exit code {rc}"
        except subprocess.TimeoutExpired:
            status = f"killed after its deadline + {GRACE_S} s"
        except Exception as e:
            status = f"could not run: {type(e).__name__}: {e}"
        groups[group] = {"status": status, "seconds": round(time.time() - now, 1)}
        print(f"[{group}] process: {status} ({time.time() - now:.1f} s)", flush=True)
        try:
            write_results(out, info, groups, read_records(rows_path))
        except Exception as e:
            print(f"writing results failed: {type(e).__name__}: {e}", flush=True)
    recs = read_records(rows_path)
    write_results(out, info, groups, recs)
    os.unlink(rows_path)
    bad = [c["what"] for c in recs if c["type"] == "check" and not c["ok"]]
    print(f"\nwrote {out / 'kernels.json'} and {out / 'kernels.md'} in {time.time() - t0:.0f} s; "
          f"{len([r for r in recs if r['type'] == 'row'])} rows, "
          f"{'checks FAILED: ' + ', '.join(bad) if bad else 'all checks ok' if any(r['type'] == 'check' for r in recs) else 'no checks ran'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
