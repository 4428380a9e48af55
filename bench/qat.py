"""Quantization-aware training on SmolLM2-135M: perplexity (ANCHORS protocol: 16 windows x 1024
tokens of the Britannica article) against training minutes, beside the PTQ anchors.

    .venv/bin/python bench/qat.py --threads 2 --init gptq|rtn --symmetric|--asymmetric \
        [--steps 300 --generate 300 --learn scales|all ...] [--points 4]

Options after the bench's own are ``qcompile qat``'s (the same parser). Each curve point
evaluates the fake-quantized model in fp32 (the reference ops' arithmetic): the init's codes
(step 0), then evenly spaced steps; evaluation time is not training time. The last row is the
compiled artifact, evaluated through the served path and through the reference ops."""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2  # noqa: E402
from serving import cpu_name  # noqa: E402

from qcompiler import load  # noqa: E402
from qcompiler.compiler import compile_model  # noqa: E402
from qcompiler.data import britannica_text  # noqa: E402
from qcompiler.evaluate import eval_tokens, perplexity  # noqa: E402
from qcompiler.models import load_model_py  # noqa: E402
from qcompiler.qat_cli import add_parser, train_source  # noqa: E402

ANCHORS = {True: {"float": 22.62, "RTN": 32.68, "our GPTQ": 26.31, "llm-compressor GPTQ": 30.91},
           False: {"float": 22.62, "RTN": 28.87, "our GPTQ": 25.96, "llm-compressor GPTQ": 26.55}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--points", type=int, default=4, help="curve points over the run")
    ap.add_argument("--windows", type=int, default=16)
    ours, rest = ap.parse_known_args()
    qat = argparse.ArgumentParser()
    add_parser(qat.add_subparsers(dest="cmd"))
    a = qat.parse_args(["qat", str(ROOT / "examples/smollm2.py"), "--group-size", "64", "-q"] + rest)
    torch.set_num_threads(ours.threads)
    src = load_model_py(ROOT / "examples/smollm2.py")
    tokens = eval_tokens(src.tokenizer, britannica_text(), ours.windows * 1024)
    ppl = lambda m: perplexity(lambda ids, pos: m(input_ids=ids[None], position_ids=pos[None]).logits[0],  # noqa: E731
                               tokens, 1024)
    marks = {0} | {round(a.steps * (k + 1) / ours.points) for k in range(ours.points)}  # 0: the init's codes
    curve = []

    def on_step(step, seconds):
        if step in marks:
            curve.append({"step": step, "train_min": round(seconds / 60, 1), "ppl": round(ppl(src.model), 3)})
            print(json.dumps(curve[-1]), flush=True)

    sym = bool(a.symmetric)  # w4a16's default: asymmetric
    print(f"SmolLM2-135M W4A16 g64 {'sym' if sym else 'asym'}, QAT init {a.init}, {a.steps} steps x "
          f"{a.batch_tokens} tokens, lr {a.lr}, --scale-lr {a.scale_lr or 'default'}, --learn {a.learn}, "
          f"--generate {a.generate}, --train-norms {a.train_norms}, "
          f"{cpu_name()}, torch {torch.__version__}, {ours.threads} threads",
          flush=True)
    res = train_source(a, src, on_step)
    out = ROOT / "build" / f"smollm2-qat-g64{'sym' if sym else 'asym'}-{a.init}"
    compile_model(src, None, out, progress=False)
    served, reference = perplexity(load(out).flat, tokens, 1024), perplexity(load(out, fast=False).flat, tokens, 1024)
    print(f"\n| training min | step | perplexity (fake-quant, fp32) |\n|---|---|---|")
    for c in curve:
        print(f"| {c['train_min']} | {c['step']} | {c['ppl']:.2f} |")
    rec = src.checkpoint.record
    print(f"\nartifact {out.name}: served {served:.3f}, reference ops {reference:.3f}; training {res.seconds / 60:.1f} min "
          f"(scale lr {res.scale_lr}), init {rec['init']} on {rec['calib_samples']} samples "
          f"{rec['init_seconds'] / 60:.1f} min, "
          f"{res.tokens} tokens, KD loss {res.loss_first:.4f} -> {res.loss_last:.4f}; data: {rec['data']['source']}, "
          + ("read from the cache" if rec["samples_cached"] else f"sampled in {rec['sampling_seconds'] / 60:.1f} min"))
    print("anchors: " + ", ".join(f"{k} {v}" for k, v in ANCHORS[sym].items()))


if __name__ == "__main__":
    main()
