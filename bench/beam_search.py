"""Beam search on SmolLM2-135M-Instruct: KV blocks saved by sharing, and wall time against
transformers' ``generate(num_beams=4)``, in one run.

    .venv/bin/python bench/beam_search.py [--threads 2] [--prompts 8] [--rounds 2] [--output-scale 0.5]

Workload: ``--prompts`` slices of the Britannica text with ShareGPT-shaped lengths
(``serving.sharegpt_lengths``: log-normal, means 161 prompt / 338 new tokens), the new-token counts
scaled by ``--output-scale`` to keep the anchor within minutes on two cores. Beam width 4, length
penalty 1, EOS ignored so that both systems generate the same lengths (transformers is given an
EOS id that never comes).

- ours: ``LLM.beam_search`` over all prompts at once (continuous batching, blocks of 16), on the
  float artifact (fp32 KV, the anchor's arithmetic: its hypotheses are checked against the
  anchor's) and the W4A16 artifact of ``bench/serving.py`` (bf16 KV).
- anchor: transformers ``generate(num_beams=4)`` in fp32, prompt by prompt (one call runs one
  batch to one length; a padded batch of these prompts would generate each to the longest).
- sharing: blocks the live beams hold against what the same beams would hold unshared, summed
  over every step (``LLM.stats()["beam_kv_saved"]``), and at the step where unshared is largest.

Candidates alternate in rounds; median (min-max) wall time.
"""
import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import artifact, cpu_name, sharegpt_lengths  # noqa: E402

import smollm2  # noqa: E402  (on the path through serving)
from qcompiler import LLM, BeamSearchParams  # noqa: E402
from qcompiler.data import britannica_text  # noqa: E402

WIDTH, NEVER = 4, 49151  # NEVER: a token id that never comes (transformers' stand-in for ignore_eos)


def workload(n: int, scale: float, tokens: list[int]) -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        plen, olen = sharegpt_lengths(rng)
        out.append((tokens[8000 + 997 * i: 8000 + 997 * i + plen], max(8, round(olen * scale))))
    return out


def ours(llm: LLM, work) -> tuple[float, list, dict]:
    """Wall time, hypotheses per prompt, sharing figures."""
    eng = llm.engine
    eng.beam_block_steps = [0, 0]
    t0 = time.perf_counter()
    groups = [eng.add_beam_search(p, BeamSearchParams(beam_width=WIDTH, max_tokens=n, ignore_eos=True))
              for p, n in work]
    peak = (0, 0)
    while not all(g.done for g in groups):
        eng.step()
        st = eng.beam_stats()
        if st["beam_blocks_unshared"] > peak[1]:
            peak = (st["beam_blocks_held"], st["beam_blocks_unshared"])
    wall = time.perf_counter() - t0
    assert all(len(g.sequences) == WIDTH for g in groups)
    return wall, [[s.token_ids for s in g.sequences] for g in groups], \
        {"saved": eng.beam_stats()["beam_kv_saved"], "peak": peak}


def anchor(model, work) -> tuple[float, list]:
    t0 = time.perf_counter()
    outs = []
    with torch.no_grad():
        for p, n in work:
            ids = torch.tensor([p])
            r = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=WIDTH, do_sample=False,
                               max_new_tokens=n, num_return_sequences=WIDTH, eos_token_id=[NEVER], pad_token_id=2)
            outs.append(r[:, len(p):].tolist())
    return time.perf_counter() - t0, outs


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})" if len(xs) > 1 else f"{xs[0]:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--output-scale", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokens = smollm2.build_tokenizer()(britannica_text())["input_ids"]
    work = workload(args.prompts, args.output_scale, tokens)
    model = smollm2._source().model.eval()
    llms = {"float": LLM(artifact("float"), kv_cache_dtype="float32"), "w4a16": LLM(artifact("w4a16"))}
    times = {"float": [], "w4a16": [], "transformers": []}
    for _ in range(args.rounds):
        t, ref = anchor(model, work)
        times["transformers"].append(t)
        for name, llm in llms.items():
            t, hyps, share = ours(llm, work)
            times[name].append(t)
            if name == "float":
                same = sum(h == r for h, r in zip(hyps, ref))
            shares = share if name == "float" else shares
    new = sum(n for _, n in work) * WIDTH
    print(f"\nSmolLM2-135M-Instruct, {cpu_name()}, {args.threads} threads, torch {torch.__version__}; "
          f"{args.prompts} prompts of {sum(len(p) for p, _ in work)} tokens in all "
          f"({min(len(p) for p, _ in work)}–{max(len(p) for p, _ in work)}), "
          f"{sum(n for _, n in work)} new tokens per beam in all ({min(n for _, n in work)}–{max(n for _, n in work)}), "
          f"beam width {WIDTH}, {args.rounds} rounds\n")
    print("| system | wall s | beam tokens/s | × transformers |")
    print("|---|---|---|---|")
    base = statistics.median(times["transformers"])
    for name, label in (("transformers", "transformers `generate(num_beams=4)`, fp32, prompt by prompt"),
                        ("float", "ours, float artifact, fp32 KV"), ("w4a16", "ours, W4A16 g64 asym, bf16 KV")):
        t = statistics.median(times[name])
        print(f"| {label} | {med(times[name])} | {new / t:.1f} | {base / t:.2f} |")
    held, unshared = shares["peak"]
    print(f"\nfloat artifact: {same}/{len(work)} prompts with the anchor's {WIDTH} hypotheses, token for token")
    print(f"KV blocks saved by sharing, over every step: {100 * shares['saved']:.1f}% (goal ≥ 40%); at the step "
          f"with most unshared blocks: {held} held vs {unshared} unshared ({100 * (1 - held / unshared):.1f}% saved)")


if __name__ == "__main__":
    main()
