"""``qcompile export --format compressed-tensors`` on SmolLM2-135M: perplexity through stock
transformers (compressed-tensors decompressing on the CPU) on the exported directory against our
artifact (its reference ops: fp32, as transformers runs), the ANCHORS protocol (16 windows x 1,024
tokens of the Britannica article); export seconds; the round trip (export, compile the export
again: the same tensors bit for bit).

    .venv/bin/python bench/export.py [--threads 2] [--windows 16] [--out build/export]
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import cpu_name  # noqa: E402

import smollm2  # noqa: E402  (on the path through serving)
from qcompiler import load  # noqa: E402
from qcompiler.capture import FlatTokenModule  # noqa: E402
from qcompiler.compiler import compile_model  # noqa: E402
from qcompiler.data import britannica_text  # noqa: E402
from qcompiler.evaluate import eval_tokens, perplexity  # noqa: E402
from qcompiler.export import export_compressed_tensors  # noqa: E402
from qcompiler.models import load_model_py  # noqa: E402
from qcompiler.targets import W4A16, W8A8  # noqa: E402

SCHEMES = {"W4A16 RTN g64 asym": W4A16(group_size=64, method="rtn"),
           "W4A16 GPTQ g64 asym": W4A16(group_size=64, method="gptq"),
           "W8A8 SmoothQuant 0.8, dynamic per-token": W8A8()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default="build/export")
    ap.add_argument("--rounds", type=int, default=3, help="export timings per scheme")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM
    src = load_model_py(Path(smollm2.__file__))
    tokens = eval_tokens(src.tokenizer, britannica_text(), a.windows * 1024)
    rows = []
    for label, target in SCHEMES.items():
        art = Path(a.out) / label.split(",")[0].replace(" ", "-").lower()
        if not (art / "manifest.json").exists():
            compile_model(src, target, art)
        secs = []
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(a.rounds):
                t0 = time.perf_counter()
                export_compressed_tensors(art, Path(tmp) / f"ct{r}")
                secs.append(time.perf_counter() - t0)
            ct = Path(tmp) / "ct0"
            mib = sum(f.stat().st_size for f in ct.glob("*.safetensors")) / 2**20
            ours = perplexity(load(art, fast=False).flat, tokens, 1024)
            hf = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32).eval()
            theirs = perplexity(FlatTokenModule(hf), tokens, 1024)
            again = compile_model(str(ct), None, Path(tmp) / "again", verify=False)
            x, y = load_file(art / "weights.safetensors"), load_file(again.out / "weights.safetensors")
            same = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype for k in x)
        rows.append((label, ours, theirs, statistics.median(secs), min(secs), max(secs), mib, same))
        print(rows[-1], flush=True)
    print(f"\nSmolLM2-135M-Instruct, {cpu_name()}, {a.threads} threads, torch {torch.__version__}, "
          f"{a.windows} x 1,024 tokens\n")
    print("| scheme | PPL, our artifact (reference ops) | PPL, transformers on the export | Δ | export s | "
          "export MiB | round trip |")
    print("|---|---|---|---|---|---|---|")
    for label, ours, theirs, med, lo, hi, mib, same in rows:
        print(f"| {label} | {ours:.3f} | {theirs:.3f} | {100 * (theirs / ours - 1):+.2f}% | {med:.1f} ({lo:.1f}–{hi:.1f})"
              f" | {mib:.1f} | {'bit for bit' if same else 'DIFFERS'} |")


if __name__ == "__main__":
    main()
