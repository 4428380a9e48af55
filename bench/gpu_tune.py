"""Tile sweep for the W4A16 Triton GEMM at decode sizes: the data behind ``pick_config``.

For each (M, K, N) it times a grid of (BLOCK_N, BLOCK_K, split-K, warps, stages) with the
weights rotated past L2, prints the five fastest and the heuristic's own pick beside them,
and writes ``$OUT/tune.json``.

    python bench/gpu_tune.py
"""
import itertools
import json
import os
import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/gpu_tune.py needs a CUDA device", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    from qcompiler.codegen.cuda import n_contiguous
    from qcompiler.codegen.triton_linear import LinearConfig, pick_config, wq_linear_triton

    dev = torch.device("cuda")
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 << 20)
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "out")
    os.makedirs(out_dir, exist_ok=True)
    G = 128
    res = []
    for (K, N), M in [((4096, 11008), 1), ((11008, 4096), 1), ((8192, 28672), 1), ((4096, 11008), 16),
                      ((4096, 11008), 64)]:
        copies = max(2, int(4 * l2 // (N * K // 2)) + 1)
        ws = [(torch.randint(0, 256, (N, K // 2), device=dev, dtype=torch.uint8),
               n_contiguous(torch.rand(N, K // G, device=dev, dtype=torch.bfloat16) / 64),
               n_contiguous(torch.randint(-8, 8, (N, K // G), device=dev, dtype=torch.int8))) for _ in range(copies)]
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        state = {"i": 0}

        def run(cfg):
            w = ws[state["i"]]
            state["i"] = (state["i"] + 1) % len(ws)
            return wq_linear_triton(x, *w, None, bits=4, config=cfg)

        if M <= 16:
            grid = itertools.product((16,), (32, 64, 128), (64, 128), (1, 2, 4, 8), (4,), (4,))
        else:
            grid = itertools.product((32, 64), (64, 128), (64, 128), (1, 2), (4,), (4,))
        times = []
        for bm, bn, bk, split, warps, stages in grid:
            cfg = LinearConfig(bm, bn, bk, split, warps, stages)
            try:
                us = do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median") * 1e3
            except Exception as e:  # a config that does not compile (resources) is skipped
                print(f"  {cfg}: {type(e).__name__}", flush=True)
                continue
            times.append((us, cfg))
        times.sort(key=lambda t: t[0])
        pick = pick_config(M, N, K, G, 4, dev)
        pick_us = do_bench(lambda: run(None), warmup=5, rep=20, return_mode="median") * 1e3
        ideal = N * K / 2 / 4.27e12 * 1e6
        print(f"M={M} K={K} N={N}: heuristic {pick} {pick_us:.1f} us; copy-rate ideal {ideal:.1f} us", flush=True)
        for us, cfg in times[:5]:
            print(f"  {us:7.1f} us  {cfg}", flush=True)
        res.append({"M": M, "K": K, "N": N, "heuristic": pick._asdict(), "heuristic_us": pick_us,
                    "best": [{"us": us, **cfg._asdict()} for us, cfg in times[:5]]})
        json.dump(res, open(os.path.join(out_dir, "tune.json"), "w"), indent=1)
        del ws
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
