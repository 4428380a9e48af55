"""Quantized KV caches (int8, fp8 e4m3) against the bf16 cache, SmolLM2-135M W4A16 g64, one run.

    .venv/bin/python bench/kv_cache.py [--threads 2] [--rounds 3] [--windows 16] [--parts accuracy,capacity,speed]

- accuracy: perplexity of the ANCHORS protocol (16 windows x 1024 tokens of the Britannica
  article), each window prefilled in chunks of 128 tokens into the paged cache, so attention
  reads every earlier token back from the stored cache (``qcompile eval --kv-cache-dtype``).
- capacity: tokens a fixed ``kv_cache_memory`` (256 MiB) holds, from the engine's pool.
- speed: decode tok/s of the default engine path, batch 1 at 2,048 tokens of context and 16
  sequences at 1,024 each. Every cache is prefilled first (untimed); then the caches take turns,
  a window of decode steps each, in alternating order; median (min-max) over the windows.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import ARTIFACTS, artifact, cpu_name, med  # noqa: E402

import smollm2  # noqa: E402  (examples/, on the path through serving)
from qcompiler import LLM, SamplingParams, load  # noqa: E402
from qcompiler.data import britannica_text  # noqa: E402
from qcompiler.evaluate import eval_tokens, perplexity  # noqa: E402
from qcompiler.llm import KV_CACHE_DTYPES  # noqa: E402

DTYPES = ("bfloat16", "int8", "fp8")
CHUNK, MEMORY = 128, 256 << 20


def accuracy(path: str, windows: int) -> None:
    m = load(path)
    tokens = eval_tokens(m.tokenizer, britannica_text(), windows * 1024)
    print(f"\n### Perplexity, {windows} windows x 1024 tokens, prefilled {CHUNK} tokens a chunk through the cache\n")
    print("| KV cache | perplexity | vs bf16 cache | seconds |\n|---|---|---|---|")
    base = None
    for dt in DTYPES:
        t0 = time.perf_counter()
        ppl = perplexity(m.chunked(KV_CACHE_DTYPES[dt], CHUNK), tokens, 1024)
        base = base or ppl
        print(f"| {dt} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {time.perf_counter() - t0:.0f} |", flush=True)


def capacity(path: str) -> None:
    print(f"\n### Tokens in a {MEMORY >> 20} MiB KV pool (blocks of 16)\n")
    print("| KV cache | bytes a token (all layers) | tokens | vs bf16 |\n|---|---|---|---|")
    base = None
    for dt in DTYPES:
        kv = LLM(path, kv_cache_dtype=dt, kv_cache_memory=MEMORY).engine.runner.kv_cache
        tokens = kv.shape[2] * kv.shape[3]
        base = base or tokens
        print(f"| {dt} | {kv.numel() * kv.element_size() // tokens} | {tokens} | {tokens / base:.2f}× |")


def decode_rates(path: str, prompts: list[list[int]], rounds: int, steps: int) -> dict[str, list[float]]:
    """Decode tok/s per cache dtype over ``rounds`` windows of ``steps`` steps, caches alternating."""
    engines = {}
    for dt in DTYPES:
        llm = LLM(path, kv_cache_dtype=dt, kv_cache_memory=len(prompts) * (len(prompts[0]) + 256) * 24 * 1024,
                  prefix_cache=False, max_num_seqs=len(prompts))
        eng = llm.engine
        reqs = [eng.add_request(p, SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True))
                for p in prompts]
        while any(not r.seq.completion_token_ids for r in reqs):  # prefill, untimed
            eng.step()
        engines[dt] = eng
    rates = {dt: [] for dt in DTYPES}
    for r in range(rounds):
        for dt in (DTYPES if r % 2 == 0 else DTYPES[::-1]):
            eng = engines[dt]
            t0 = time.perf_counter()
            for _ in range(steps):
                eng.step()
            rates[dt].append(len(prompts) * steps / (time.perf_counter() - t0))
    return rates


def speed(path: str, rounds: int, tokens: list[int], threads: int) -> None:
    cases = {"batch 1, 2,048 tokens of context": [tokens[:2048]],
             "16 sequences, 1,024 tokens of context each": [tokens[1024 * i: 1024 * (i + 1)] for i in range(16)]}
    for label, prompts in cases.items():
        rates = decode_rates(path, prompts, rounds, 16 if len(prompts) == 1 else 8)
        base = statistics.median(rates["bfloat16"])
        print(f"\n### Decode, {label}, {threads} thread(s), {rounds} windows each\n")
        print("| KV cache | decode tok/s | vs bf16 cache |\n|---|---|---|")
        for dt, r in rates.items():
            print(f"| {dt} | {med(r)} | {statistics.median(r) / base:.2f}× |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--parts", default="accuracy,capacity,speed")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = artifact("w4a16")
    print(f"SmolLM2-135M-Instruct {ARTIFACTS['w4a16'][0].name} (W4A16 g64 asym), {cpu_name()}, "
          f"torch {torch.__version__}, {a.threads} thread(s)")
    parts = a.parts.split(",")
    if "accuracy" in parts:
        accuracy(path, a.windows)
    if "capacity" in parts:
        capacity(path)
    if "speed" in parts:
        speed(path, a.rounds, smollm2.build_tokenizer()(britannica_text())["input_ids"], a.threads)


if __name__ == "__main__":
    main()
