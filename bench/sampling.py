"""The batched sampler against a per-request loop, on SmolLM2's real next-token logits.

    .venv/bin/python bench/sampling.py [--threads 1] [--rows 16] [--rounds 7]

Logits: the bundled SmolLM2-135M (transformers, fp32) over a 128-token slice of the Britannica
text, one row per position. Per request (the anchor): ``sampling_probs_ref`` (temperature, top-k
and top-p by full sorts) and ``torch.multinomial``, one row at a time. Ours: ``sample_batch``
over all rows at once, in its PyTorch form and through ``qc_cpu::sample_rows`` (the native
kernels). Alternating rounds, median ms per step of ``--rows`` requests.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))  # the bundled model file, imported as a module

import smollm2  # noqa: E402
from qcompiler.data import britannica_text  # noqa: E402
from qcompiler.codegen import cpu_native  # noqa: E402
from qcompiler.runtime.sampling import SamplingParams, sample_batch, sampling_probs_ref  # noqa: E402

SETTINGS = [SamplingParams(temperature=0.8), SamplingParams(temperature=0.7, top_p=0.9),
            SamplingParams(temperature=1.0, top_p=0.95), SamplingParams(temperature=1.0, top_k=40),
            SamplingParams(temperature=0.8, top_k=50, top_p=0.95)]


def per_request(logits, params):
    return [int(torch.multinomial(sampling_probs_ref(row, params), 1)) for row in logits]


def batched(rows, p, native: bool):
    cpu_native.built = (lambda: True) if native else (lambda: False)
    return sample_batch(rows, [p] * len(rows), [None] * len(rows))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    model, tok = smollm2.build_model().eval(), smollm2.build_tokenizer()
    ids = tok(britannica_text())["input_ids"][5000:5128]
    with torch.no_grad():
        all_logits = model(input_ids=torch.tensor(ids)[None]).logits[0]
    torch.set_num_threads(args.threads)
    print(f"\n{args.rows} requests per step, vocabulary {all_logits.shape[1]}, {args.threads} thread(s), "
          f"torch {torch.__version__}; median ms per step over {args.rounds} rounds x {len(ids) // args.rows} steps\n")
    native = cpu_native.available()
    print("| sampling | per request (reference) | batched, PyTorch | batched, native | speed-up |")
    print("|---|---|---|---|---|")
    for p in SETTINGS:
        times = {"ref": [], "torch": [], "native": []}
        for _ in range(args.rounds):
            for start in range(0, len(ids) - args.rows + 1, args.rows):
                rows = all_logits[start:start + args.rows]
                for name, fn in (("ref", lambda: per_request(rows, p)), ("torch", lambda: batched(rows, p, False)),
                                 ("native", lambda: batched(rows, p, True))):
                    if name == "native" and not native:
                        continue
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items() if v}
        best = ms.get("native", ms["torch"])
        desc = f"T={p.temperature}" + (f", top-k {p.top_k}" if p.top_k else "") + (f", top-p {p.top_p}" if p.top_p < 1 else "")
        print(f"| {desc} | {ms['ref']:.1f} | {ms['torch']:.1f} | {ms.get('native', float('nan')):.2f} | "
              f"{ms['ref'] / best:.1f}× |")


if __name__ == "__main__":
    main()
