"""Tile sweep for the W4A16 Triton GEMM (g128, with zero points): the table ``pick_config`` reads.

For each (M, K, N), in priority order under a time budget, it times a list of tile choices with
the weights rotated past L2 (so HBM figures, as decode sees them), prints the five fastest and
the rule-based pick beside them, and writes the fastest of each as an entry of the device's
table: ``$OUT/tune.json`` and ``codegen/tuned/<device>.json`` in this checkout, so later steps of
the same GPU session run with it. Commit the table to make it the package's. Every form of
``LinearConfig`` competes but ``planes``, the first form, which stays in as a reference at
tensor-core sizes only: at GEMV sizes the weight streams and the swapped tensor-core form (rows
padded to 16), at larger M the swapped form, and from M = 256 the dequantized weight with cuBLAS.

    python bench/gpu_tune.py [--budget 150]
    .venv/bin/python bench/gpu_tune.py --smoke     # CPU, Triton interpreter, tiny shapes: plumbing only
"""
import argparse
import datetime
import json
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

GROUP = 128 if not SMOKE else 32
# (K, N): Llama-2-7B's linears as the runtime merges them (qkv, o, gate/up, down), then the
# kernel benchmark's shapes; M = 1 first (batch-1 decode), then batch 32, then the rest
E2E = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]
BENCH = [(4096, 11008), (8192, 28672)]
PLAN = ([(1, s) for s in E2E + BENCH] + [(32, s) for s in E2E] + [(4, s) for s in BENCH + E2E[3:]]
        + [(16, s) for s in BENCH + E2E[3:]] + [(64, s) for s in BENCH + E2E[3:]]
        + [(128, s) for s in BENCH + E2E[3:]] + [(256, s) for s in BENCH + E2E[3:]]
        + [(1024, s) for s in BENCH + E2E[3:]])
if SMOKE:
    PLAN = [(1, (64, 96)), (16, (64, 96)), (256, (64, 96))]

# (block_n, block_k, num_warps, num_stages); block_m follows M; each is tried at these splits
# the weight-stream GEMVs (``form`` words / stream): per lane, 16 weight bytes per K step and
# BLOCK_M x (its bytes) fp32 partial sums, so small tiles where M is 4
STREAM = [(128, 128, 4, 1), (128, 64, 4, 1), (256, 64, 8, 1), (64, 128, 4, 1), (128, 32, 4, 1), (256, 32, 8, 1),
          (128, 64, 4, 2), (64, 64, 2, 1)]
DOT = [(128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 4)]
DEQUANT = [(64, 128, 4, 1), (32, 128, 4, 1), (128, 64, 8, 1)]
if SMOKE:
    STREAM, DOT, DEQUANT = [(32, 32, 2, 1)], [(32, 32, 4, 2)], [(32, 32, 4, 1)]


def block_m(M: int) -> int:
    from qcompiler.codegen.cuda import pow2_ceil
    from qcompiler.codegen.triton_linear_tiles import GEMV_MAX_M
    return pow2_ceil(M) if M <= GEMV_MAX_M else min(128, max(16, pow2_ceil(M)))


def candidates(M: int):
    from qcompiler.codegen.triton_linear_tiles import GEMV_MAX_M, LinearConfig
    bm = block_m(M)
    splits = (1, 2, 4, 8) if M <= GEMV_MAX_M else (1, 2, 4) if M <= 64 else (1,)
    # ``planes`` (more issue cycles per weight in the sm_90 count) stays in as a reference, two
    # tiles at tensor-core sizes: each tile is a compile, and the budget is minutes
    if M <= GEMV_MAX_M:  # the streams, and the swapped tensor-core form with rows padded to 16
        tiles = [(t, form) for form in ("words", "stream") for t in STREAM] + [(t, "swap") for t in DOT[:3]]
    else:  # the swapped tensor-core form (weights the left operand, from registers) first
        tiles = [(t, "swap") for t in DOT] + [(t, "planes") for t in DOT[:2]]
        if M >= 256:  # the weight dequantized once, then cuBLAS: (block_n, block_k, warps) of the dequantizing kernel
            tiles += [(t, "dequant") for t in DEQUANT]
    for (bn, bk, warps, stages), form in tiles:
        if bk > GROUP:
            continue
        # a stream needs its SMs filled; the dequantized form does not split
        for split in splits[1:] if form in ("stream", "words") else (1,) if form == "dequant" else splits:
            yield LinearConfig(max(bm, 16) if form == "swap" else bm, bn, bk, split, warps, stages, form)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for the whole sweep")
    ap.add_argument("--ms", help="comma-separated M values: only these rows of the plan")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes: plumbing only")
    args = ap.parse_args()
    plan = [(M, s) for M, s in PLAN if not args.ms or M in {int(m) for m in args.ms.split(",")}]
    if not SMOKE and not torch.cuda.is_available():
        print("bench/gpu_tune.py needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    from qcompiler.codegen.cuda import n_contiguous
    from qcompiler.codegen.triton_linear import wq_linear_triton
    from qcompiler.codegen.triton_linear_tiles import TUNED_DIR, pick_config
    from qcompiler.codegen.workspace import SplitKWorkspace

    t_end = time.monotonic() + args.budget
    dev = torch.device("cpu" if SMOKE else "cuda")
    name = "smoke" if SMOKE else torch.cuda.get_device_name(dev)
    dt = torch.float16 if SMOKE else torch.bfloat16
    l2 = 0 if SMOKE else getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "out")
    os.makedirs(out_dir, exist_ok=True)
    table = {"device": name, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
             "method": "triton do_bench median (warmup 5 ms, rep 20 ms), weights rotated past L2, bf16 activations, "
                       f"int4 g{GROUP} with int8 zero points, N-contiguous scales",
             "entries": [], "sweep": []}
    paths = [os.path.join(out_dir, "tune.json")] + ([] if SMOKE else [str(TUNED_DIR / (name.replace(" ", "_") + ".json"))])
    # entries of the device's table that this run does not measure again are kept
    kept = []
    if os.path.isfile(paths[-1]) and not SMOKE:
        measured = {(4, GROUP, N, K, M) for M, (K, N) in plan}
        kept = [e for e in json.load(open(paths[-1]))["entries"]
                if (e["bits"], e["group"], e["N"], e["K"], e["M"]) not in measured]
    table["entries"] = list(kept)

    def save():
        for p in paths:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "w") as f:
                json.dump(table, f, indent=1)

    bench = (lambda fn: do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e3) if not SMOKE else \
        (lambda fn: (fn(), 1.0)[1])
    weights, workspace = {}, SplitKWorkspace()
    for M, (K, N) in plan:
        if time.monotonic() > t_end:
            print(f"budget spent: stopped before M={M} K={K} N={N}", flush=True)
            break
        if (K, N) not in weights:
            weights.clear()
            if not SMOKE:
                torch.cuda.empty_cache()
            copies = max(2, int(2 * l2 // (N * K // 2)) + 1)
            weights[(K, N)] = [(torch.randint(0, 256, (N, K // 2), device=dev, dtype=torch.uint8),
                                n_contiguous((torch.rand(N, K // GROUP, device=dev) / 64).to(dt)),
                                n_contiguous(torch.randint(-8, 8, (N, K // GROUP), device=dev, dtype=torch.int8)))
                               for _ in range(copies)]
        ws = weights[(K, N)]
        x = torch.randn(M, K, device=dev, dtype=dt)
        state = {"i": 0}

        def run(cfg):
            w = ws[state["i"]]
            state["i"] = (state["i"] + 1) % len(ws)
            with workspace:  # split-K buffers held across calls, as a runner holds them
                return wq_linear_triton(x, *w, None, bits=4, config=cfg)

        ref = run(pick_config(M, N, K, GROUP, 4, dev)).float()
        times = []
        for cfg in candidates(M):
            if time.monotonic() > t_end:
                break
            try:
                state["i"] = 0
                err = (run(cfg).float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
                if err > 1e-2:
                    print(f"  {cfg}: wrong (relative error {err:.2e}): skipped", flush=True)
                    continue
                times.append((bench(lambda: run(cfg)), cfg))
            except Exception as e:  # a tile that does not compile (resources) is skipped
                print(f"  {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        if not times:
            continue
        times.sort(key=lambda t: t[0])
        pick = pick_config(M, N, K, GROUP, 4, dev)
        pick_us = bench(lambda: run(None))
        ideal = (N * K / 2 + N * K // GROUP * 3) / 4.25e12 * 1e6
        print(f"M={M} K={K} N={N}: rule/table pick {tuple(pick)} {pick_us:.1f} us; best {tuple(times[0][1])} "
              f"{times[0][0]:.1f} us; weight-read at copy rate {ideal:.1f} us", flush=True)
        for t, cfg in times[:5]:
            print(f"  {t:7.1f} us  {tuple(cfg)}", flush=True)
        table["entries"].append({"bits": 4, "group": GROUP, "N": N, "K": K, "M": M,
                                 "config": times[0][1]._asdict(), "us": round(times[0][0], 2)})
        table["sweep"].append({"M": M, "K": K, "N": N, "pick": pick._asdict(), "pick_us": round(pick_us, 2),
                               "best": [{"us": round(t, 2), **c._asdict()} for t, c in times[:5]],
                               "tried": len(times)})
        save()
    save()
    print(f"wrote {' and '.join(paths)}: {len(table['entries'])} entries ({len(kept)} kept from before)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
