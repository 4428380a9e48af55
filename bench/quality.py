"""Perplexity of each scheme on SmolLM2-135M, ``qcompiler.evaluate``'s protocol (16 windows x 1024 tokens
of the Britannica article), with compile seconds per stage and artifact size.

    .venv/bin/python bench/quality.py [--threads 2] [--out build/quality]

Each scheme is evaluated through the fast CPU kernels (bf16 activations, as served) and
through the canonical reference ops (fp32 activations)."""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import smollm2  # noqa: E402

from qcompiler import load  # noqa: E402
from qcompiler.capture import FlatTokenModule  # noqa: E402
from qcompiler.compiler import compile_model  # noqa: E402
from qcompiler.data import britannica_text  # noqa: E402
from qcompiler.evaluate import eval_tokens, perplexity  # noqa: E402
from qcompiler.models import load_model_py  # noqa: E402
from qcompiler.targets import FP8, W4A16, W8A8, W8A16, Float  # noqa: E402

ANCHORS = {"float": 22.62, "w4a16 g64 sym": 32.68, "w4a16 g64 asym": 28.87, "w4a16 g32 asym": 27.91,
           "w4a16 gptq g64 sym": 30.91, "w4a16 gptq g64 sym, no act-order": 30.91, "w4a16 gptq g64 asym": 26.55, "w4a16 gptq g32 asym": 25.52,
           "w4a16 awq g64 sym": 29.29, "w4a16 awq g64 asym": 26.83, "w8a8 naive": 23.46,
           "w8a8 gptq": 23.29, "w8a8 smoothquant 0.8": 23.10, "fp8 dynamic": 23.33, "fp8 dynamic gptq": 23.33,
           "w4a16 gptq g64 sym, no clip": 30.91, "w4a16 gptq g64 asym, no clip": 26.55,
           "w4a16 awq g64 sym, no clip": 29.29, "w4a16 awq g64 asym, no clip": 26.83}
SCHEMES = {
    "float": Float(),
    "w4a16 default (g128/64/32 per layer, asym, imatrix)": W4A16(),
    "w4a16 g128/64/32 per layer, sym, imatrix": W4A16(symmetric=True),
    "w4a16 g128/64/32 per layer, asym, rtn": W4A16(method="rtn"),
    "w4a16 g128/64/32 per layer, sym, rtn": W4A16(symmetric=True, method="rtn"),
    "w4a16 imatrix g64 asym": W4A16(group_size=64, method="imatrix"),
    "w4a16 g64 sym": W4A16(group_size=64, symmetric=True, method="rtn"),
    "w4a16 g64 asym": W4A16(group_size=64, symmetric=False, method="rtn"),
    "w4a16 g32 asym": W4A16(group_size=32, symmetric=False, method="rtn"),
    "w8a16 per-channel sym": W8A16(),
    "w4a16 gptq g64 sym": W4A16(group_size=64, symmetric=True, method="gptq"),
    "w4a16 gptq g64 sym, no act-order": W4A16(group_size=64, symmetric=True, method="gptq", act_order=False),
    "w4a16 gptq g64 sym, no clip": W4A16(group_size=64, symmetric=True, method="gptq", clip=False),
    "w4a16 gptq g64 asym": W4A16(group_size=64, symmetric=False, method="gptq"),
    "w4a16 gptq g64 asym, no clip": W4A16(group_size=64, symmetric=False, method="gptq", clip=False),
    "w4a16 gptq g32 asym": W4A16(group_size=32, symmetric=False, method="gptq"),
    "w4a16 awq g64 sym": W4A16(group_size=64, symmetric=True, method="awq"),
    "w4a16 awq g64 sym, no clip": W4A16(group_size=64, symmetric=True, method="awq", clip=False),
    "w4a16 awq g64 asym": W4A16(group_size=64, symmetric=False, method="awq"),
    "w4a16 awq g64 asym, no clip": W4A16(group_size=64, symmetric=False, method="awq", clip=False),
    "w8a8 naive": W8A8(smoothquant_alpha=None),
    "w8a8 gptq": W8A8(smoothquant_alpha=None, method="gptq"),
    "w8a8 smoothquant 0.8": W8A8(smoothquant_alpha=0.8),
    "fp8 dynamic": FP8(),
    "fp8 dynamic gptq": FP8(method="gptq"),
}


CALIBRATED = ("imatrix", "gptq", "awq", "smoothquant", "quantize_w8a8", "calibration data")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="build/quality")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--only", nargs="*", default=None, help="scheme labels to run (default: all)")
    ap.add_argument("--no-reference", action="store_true", help="evaluate the served path only")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    src = load_model_py(Path(smollm2.__file__))  # with the model file's calibration_texts()
    tokens = eval_tokens(src.tokenizer, britannica_text(), a.windows * 1024)
    rows = []
    eager = perplexity(FlatTokenModule(src.model), tokens, 1024)
    print(f"eager source model: {eager:.3f}", flush=True)
    for label, target in SCHEMES.items():
        if a.only and label not in a.only:
            continue
        out = Path(a.out) / label.replace(" ", "-")
        rep = compile_model(src, target, out)
        size = sum(f["bytes"] for f in rep.manifest["files"].values())
        fast = perplexity(load(out).flat, tokens, 1024)
        ref = float("nan") if a.no_reference else perplexity(load(out, fast=False).flat, tokens, 1024)
        row = {"scheme": label, "ppl_fast": round(fast, 3), "ppl_reference": round(ref, 3),
               "anchor": ANCHORS.get(label), "artifact_mib": round(size / 2**20, 1),
               "float_mib": round(rep.float_bytes / 2**20, 1), "stages_s": rep.stages}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| scheme | PPL served | PPL reference ops | anchor | vs anchor (served) | artifact MiB | method pass s | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        method_s = sum(v for k, v in r["stages_s"].items() if k.removeprefix("pass:") in CALIBRATED)
        vs = f"{100 * (r['ppl_fast'] / r['anchor'] - 1):+.1f}%" if r["anchor"] else "–"
        print(f"| {r['scheme']} | {r['ppl_fast']:.2f} | {r['ppl_reference']:.2f} | {r['anchor'] or '–'} | {vs} | "
              f"{r['artifact_mib']} | {method_s:.0f} | {sum(r['stages_s'].values()):.0f} |")
    print(f"\neager source model (fp32): {eager:.3f}; threads {a.threads}; torch {torch.__version__}")


if __name__ == "__main__":
    main()
