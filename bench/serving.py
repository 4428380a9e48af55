"""Serving benchmarks on SmolLM2-135M-Instruct, our engine and its anchors in one run.

    .venv/bin/python bench/serving.py --threads 1 [--rounds 3] [--parts single,concurrent,prefix,waste]

- single: batch-1 decode tok/s (1st -> 128th new token after a 32-token prompt, EOS blocked)
  and 512-token prefill tok/s, for our W4A16 and float artifacts, llama.cpp (the shipped Q4_1
  GGUF and its Q4_0 requantization; needs the optional ``llama-cpp-python``) and transformers
  ``generate`` in fp32 and bf16. Candidates alternate in rounds; median (min-max).
- concurrent: 16 requests x 128 new tokens through ``LLM.generate`` (greedy, and sampled with
  temperature 0.8 and top-p 0.95); aggregate tok/s, and the ratio to llama.cpp Q4_0's
  single-stream decode measured in the same run.
- prefix: 32 requests sharing a 400-token system prompt, distinct 20-token questions, 16 new
  tokens each; radix cache on vs off: wall time, output tok/s, mean time to first token, hit rate.
- waste: KV slots on two mixed-length workloads (short requests; ShareGPT-shaped lengths), from
  the block manager's accounting at every step: paged (blocks of 16 and of 8) vs preallocating
  max_model_len slots per running request.

Artifacts are compiled into ``build/`` when missing. Prompts are slices of the Britannica text.
"""
import argparse
import json
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))  # the bundled model file, imported as a module

import smollm2  # noqa: E402
from qcompiler import LLM, SamplingParams  # noqa: E402
from qcompiler.artifact import FORMAT_VERSION  # noqa: E402
from qcompiler.compiler import compile_model  # noqa: E402
from qcompiler.data import britannica_text  # noqa: E402
from qcompiler.targets import make_target  # noqa: E402

# the default w4a16 puts lm_head in int8 per channel where cheap, as on this model (llama.cpp's
# own choice for its output: Q8_0); -h16 keeps it float
ARTIFACTS = {"w4a16": (ROOT / "build/smollm2-w4a16", dict(group_size=64, symmetric=False)),
             "w4a16-h16": (ROOT / "build/smollm2-w4a16-h16", dict(group_size=64, symmetric=False, lm_head_bits=16)),
             "float": (ROOT / "build/smollm2-float", {})}
DECODE_PROMPT, DECODE_TOKENS, PREFILL_TOKENS = 32, 128, 512


def cpu_name() -> str:
    """The CPU's model name and the vector extensions that decide our kernels' speed."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = [label for flag, label in (("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"), ("avx512_bf16", "AVX512-BF16"),
                                     ("amx_tile", "AMX")) if flag in flags]
    return f"{name} ({', '.join(isa) or 'no AVX-512'})"


def artifact(name: str) -> str:
    """The artifact's path, compiled first when missing, of an older format, or of other options."""
    path, opts = ARTIFACTS[name]
    man = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").exists() else {}
    target = make_target(name.split("-")[0], **opts).to_dict()
    keys = [k for k in target if k in opts or k == "lm_head_bits"]
    same = man.get("format_version") == FORMAT_VERSION and all(man["target"].get(k) == target[k] for k in keys)
    if not same:
        print(f"compiling {path} ...", flush=True)
        compile_model(str(ROOT / "examples/smollm2.py"), make_target(name.split("-")[0], **opts), path)
    return str(path)


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})" if len(xs) > 1 else f"{xs[0]:.1f}"


# --- single stream -------------------------------------------------------------------------

class Ours:
    def __init__(self, name: str, compile: str = "auto"):
        self.llm = LLM(artifact(name), prefix_cache=False, max_num_batched_tokens=PREFILL_TOKENS, compile=compile)
        # before anything is timed: torch.compile compiles its prefill and decode graphs here
        self._run(list(range(1, PREFILL_TOKENS + 1)), 4)
        self._run(list(range(1, DECODE_PROMPT + 1)), 4)

    def _run(self, prompt: list[int], n: int) -> list[float]:
        """Times (perf_counter) at which each new token appeared."""
        eng = self.llm.engine
        req = eng.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        stamps, seen = [], 0
        while req.finish_reason is None:
            eng.step()
            while seen < len(req.seq.completion_token_ids):
                stamps.append(time.perf_counter())
                seen += 1
        return stamps

    def decode(self, prompt):
        s = self._run(prompt, DECODE_TOKENS)
        return (DECODE_TOKENS - 1) / (s[-1] - s[0])

    def prefill(self, prompt):
        t0 = time.perf_counter()
        s = self._run(prompt, 1)
        return len(prompt) / (s[0] - t0)


class LlamaCpp:
    def __init__(self, path: str, threads: int):
        from llama_cpp import Llama
        self.llm = Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=PREFILL_TOKENS,
                         verbose=False)
        self.eos = self.llm.token_eos()

    def decode(self, prompt):
        import numpy as np
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        stamps = []
        for _ in range(DECODE_TOKENS):
            logits = np.array(llm.scores[llm.n_tokens - 1])
            logits[self.eos] = -np.inf
            stamps.append(time.perf_counter())
            llm.eval([int(logits.argmax())])
        return (DECODE_TOKENS - 1) / (stamps[-1] - stamps[0])

    def prefill(self, prompt):
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        return len(prompt) / (time.perf_counter() - t0)


class Transformers:
    def __init__(self, dtype: torch.dtype):
        self.model = smollm2.build_model().to(dtype).eval()
        self.eos = smollm2.build_tokenizer().eos_token_id

    def decode(self, prompt):
        from transformers import LogitsProcessor, LogitsProcessorList
        stamps = []

        class Stamp(LogitsProcessor):  # called once per new token, after its forward pass
            def __call__(self, ids, scores):
                stamps.append(time.perf_counter())
                return scores

        ids = torch.tensor([prompt])
        with torch.no_grad():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=DECODE_TOKENS,
                                min_new_tokens=DECODE_TOKENS, do_sample=False, suppress_tokens=[self.eos],
                                logits_processor=LogitsProcessorList([Stamp()]), pad_token_id=self.eos)
        return (DECODE_TOKENS - 1) / (stamps[-1] - stamps[0])

    def prefill(self, prompt):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            t0 = time.perf_counter()
            self.model(ids, logits_to_keep=1)
            return len(prompt) / (time.perf_counter() - t0)


def single(threads: int, rounds: int, tokens: list[int]) -> dict:
    cands = {"qcompiler W4A16 g64, default (int8 lm_head, compiled ahead of time)": lambda: Ours("w4a16"),
             "qcompiler W4A16 g64, float lm_head (--lm-head-bits 16)": lambda: Ours("w4a16-h16"),
             "qcompiler W4A16 g64, torch.compile": lambda: Ours("w4a16", "jit"),
             "qcompiler W4A16 g64, eager": lambda: Ours("w4a16", "eager"),
             "qcompiler float (fp32), eager": lambda: Ours("float", "eager")}
    try:
        import llama_cpp
        q4_0 = Path("build/smollm2-q4_0.gguf")
        if not q4_0.exists():
            p = llama_cpp.llama_model_quantize_default_params()
            p.ftype, p.allow_requantize, p.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, True, threads
            q4_0.parent.mkdir(exist_ok=True)
            assert llama_cpp.llama_model_quantize(str(smollm2.gguf_path()).encode(), str(q4_0).encode(), p) == 0
        cands["llama.cpp Q4_0 (requantized)"] = lambda: LlamaCpp(str(q4_0), threads)
        cands["llama.cpp Q4_1 (shipped)"] = lambda: LlamaCpp(str(smollm2.gguf_path()), threads)
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp anchor (make bench-deps)")
    cands["transformers fp32 generate"] = lambda: Transformers(torch.float32)
    cands["transformers bf16 generate"] = lambda: Transformers(torch.bfloat16)
    built = {k: f() for k, f in cands.items()}
    res = {k: {"decode": [], "prefill": []} for k in built}
    decode_prompt, prefill_prompt = tokens[:DECODE_PROMPT], tokens[1000:1000 + PREFILL_TOKENS]
    for r in range(rounds):
        order = list(built) if r % 2 == 0 else list(reversed(built))
        for k in order:
            res[k]["decode"].append(built[k].decode(decode_prompt))
            res[k]["prefill"].append(built[k].prefill(prefill_prompt))
        print(f"  round {r + 1}/{rounds} done", flush=True)
    anchor = "llama.cpp Q4_0 (requantized)"
    print(f"\n### Single stream, {threads} thread(s), {rounds} rounds: median (min–max)\n")
    print("| system | batch-1 decode tok/s | × llama.cpp Q4_0 | 512-token prefill tok/s | × llama.cpp Q4_0 |")
    print("|---|---|---|---|---|")
    a = {m: statistics.median(res[anchor][m]) for m in ("decode", "prefill")} if anchor in res else None
    for k, v in res.items():
        d, p = statistics.median(v["decode"]), statistics.median(v["prefill"])
        rd = f"{d / a['decode']:.2f}" if a else "–"
        rp = f"{p / a['prefill']:.2f}" if a else "–"
        print(f"| {k} | {med(v['decode'])} | {rd} | {med(v['prefill'])} | {rp} |")
    return {"llama_decode": a["decode"] if a else None}


# --- concurrent ----------------------------------------------------------------------------

GREEDY = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=128, temperature=0.8, top_p=0.95, seed=0, ignore_eos=True)
CONCURRENT = {"W4A16 g64, eager": ("w4a16", "eager", GREEDY),
              "W4A16 g64, float lm_head, default": ("w4a16-h16", "auto", GREEDY),
              "W4A16 g64, default": ("w4a16", "auto", GREEDY),
              "W4A16 g64, default, sampled (T 0.8, top-p 0.95)": ("w4a16", "auto", SAMPLED)}


def concurrent(rounds: int, tokens: list[int]) -> dict[str, list[float]]:
    """Aggregate tok/s per round and engine. Run before the single-stream candidates are built: the
    other systems' threads and buffers cost the eager engine up to ~20% when measured after them."""
    prompts = [tokens[2000 + 97 * i: 2000 + 97 * i + DECODE_PROMPT] for i in range(16)]
    llms = {}
    for a, c, _ in CONCURRENT.values():
        if (a, c) not in llms:
            llms[a, c] = LLM(artifact(a), prefix_cache=False, compile=c)
            llms[a, c].generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    rates = {k: [] for k in CONCURRENT}
    for r in range(rounds):
        for k in (list(CONCURRENT) if r % 2 == 0 else list(reversed(CONCURRENT))):
            a, c, params = CONCURRENT[k]
            t0 = time.perf_counter()
            outs = llms[a, c].generate(prompts, params)
            rates[k].append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0))
    return rates


def print_concurrent(threads: int, rates: dict[str, list[float]], anchor_decode) -> None:
    print(f"\n### 16 concurrent requests × 128 new tokens (32-token prompts), {threads} thread(s), "
          f"{len(next(iter(rates.values())))} rounds\n")
    for k, r in rates.items():
        ratio = f"{statistics.median(r) / anchor_decode:.2f}×" if anchor_decode else "–"
        print(f"qcompiler {k} aggregate: {med(r)} tok/s (prefill included); vs llama.cpp Q4_0 single-stream "
              f"decode in this run: {ratio} (goal ≥ 5×)")


# --- shared prefix -------------------------------------------------------------------------

def shared_prefix(threads: int, tokens: list[int]) -> None:
    system = tokens[5000:5400]
    questions = [tokens[6000 + 50 * i: 6000 + 50 * i + 20] for i in range(32)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    rows = {}
    for on in (False, True):
        llm = LLM(artifact("w4a16"), prefix_cache=on)
        eng = llm.engine
        reqs = []
        t0 = time.perf_counter()
        for q in questions:
            reqs.append(eng.add_request(system + q, params))
        first: dict[int, float] = {}
        while not all(r.done for r in reqs):
            eng.step()
            now = time.perf_counter()
            for r in reqs:
                if r.seq.completion_token_ids and id(r) not in first:
                    first[id(r)] = now - t0
        wall = time.perf_counter() - t0
        out = sum(len(r.seq.completion_token_ids) for r in reqs)
        rows[on] = (wall, out / wall, statistics.mean(first.values()), llm.stats()["prefix_cache_hit_rate"])
    print(f"\n### Shared prefix: 32 requests, 400-token system prompt + 20-token question, 16 new tokens, "
          f"{threads} thread(s)\n")
    print("| radix cache | wall s | output tok/s | mean TTFT s | prefix hit rate |")
    print("|---|---|---|---|---|")
    for on, (wall, tps, ttft, hit) in rows.items():
        print(f"| {'on' if on else 'off'} | {wall:.1f} | {tps:.1f} | {ttft:.2f} | {hit:.1%} |")
    print(f"\nspeed-up on / off: throughput {rows[True][1] / rows[False][1]:.2f}×, "
          f"mean TTFT {rows[False][2] / rows[True][2]:.2f}× (goal ≥ 3×)")


# --- KV waste ------------------------------------------------------------------------------

def short_lengths(rng: random.Random) -> tuple[int, int]:
    return rng.randint(8, 200), rng.randint(8, 96)


def sharegpt_lengths(rng: random.Random) -> tuple[int, int]:
    """Log-normal prompt and output lengths with ShareGPT's means (161 and 338 tokens, as in the
    vLLM paper's workload), each capped at 1,024."""
    def draw(mean):
        return max(4, min(1024, round(rng.lognormvariate(math.log(mean) - 0.5, 1.0))))
    return draw(161), draw(338)


WORKLOADS = {"short": ("prompts 8–200 tokens, 8–96 new (uniform)", short_lengths),
             "sharegpt": ("ShareGPT-shaped: log-normal lengths, means 161 prompt / 338 new, capped at 1,024",
                          sharegpt_lengths)}


def kv_waste(threads: int, tokens: list[int], max_model_len: int = 2048) -> None:
    for name, (title, lengths) in WORKLOADS.items():
        print(f"\n### KV waste, {name}: 24 requests, {title}, up to 16 running, summed over every step\n")
        print("| allocation | steps | slots held | slots used | waste |")
        print("|---|---|---|---|---|")
        for block_size in (16, 8):
            rng = random.Random(0)
            llm = LLM(artifact("w4a16"), prefix_cache=False, max_num_seqs=16, block_size=block_size)
            eng = llm.engine
            reqs = []
            for i in range(24):
                plen, olen = lengths(rng)
                reqs.append(eng.add_request(tokens[8000 + 211 * i: 8000 + 211 * i + plen],
                                            SamplingParams(max_tokens=olen, temperature=0.0, ignore_eos=True)))
            used = alloc = prealloc = steps = 0
            while not all(r.done for r in reqs):
                eng.step()
                running = eng.scheduler.running
                u = eng.bm.slot_usage(running)
                used, alloc = used + u["slots_used"], alloc + u["slots_allocated"]
                prealloc += len(running) * max_model_len
                steps += 1
            print(f"| paged, blocks of {block_size} | {steps} | {alloc} | {used} | {1 - used / alloc:.1%} |")
        mean_len = statistics.mean(len(r.seq) for r in reqs)
        print(f"| max-length preallocation ({max_model_len} per running request), same run as blocks of 8 | "
              f"{steps} | {prealloc} | {used} | {1 - used / prealloc:.1%} |")
        print(f"\nmean final sequence length {mean_len:.0f} tokens")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", default="single,concurrent,prefix,waste")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    tokens = smollm2.build_tokenizer()(britannica_text())["input_ids"]
    print(f"SmolLM2-135M-Instruct, {args.threads} thread(s), torch {torch.__version__}")
    rates = concurrent(max(2, args.rounds - 1), tokens) if "concurrent" in parts else None
    anchor = single(args.threads, args.rounds, tokens)["llama_decode"] if "single" in parts else None
    if rates:
        print_concurrent(args.threads, rates, anchor)
    if "prefix" in parts:
        shared_prefix(args.threads, tokens)
    if "waste" in parts:
        kv_waste(args.threads, tokens)


if __name__ == "__main__":
    main()
