"""``qcompile eval``, ``generate`` and ``report``: the subcommands that run or draw an artifact,
and the ``--compile``/``--eager`` option they share with ``serve``."""
import argparse
import json
import sys
import time
from pathlib import Path


def print_pass_checks(manifest: dict) -> None:
    from .report import pass_checks
    print("\n".join("  " + line for line in pass_checks(manifest)))


def add_compile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", nargs="?", const="jit", default="auto", choices=("auto", "aot", "jit", "eager"),
                   help="how the program runs: auto (default: on CPU compiled ahead of time for this machine, about a "
                        "minute the first time and cached, then loaded in a second; on CUDA replayed from CUDA graphs), "
                        "aot, jit (torch.compile; the default without a value) or eager")
    p.add_argument("--eager", dest="compile", action="store_const", const="eager",
                   help="run the program uncompiled, op by op (for debugging)")


def cmd_eval(a) -> int:
    from . import load
    from .capture import FlatTokenModule
    from .data import britannica_text
    from .evaluate import eval_tokens, perplexity
    from .llm import KV_CACHE_DTYPES, kv_cache_dtype_of
    from .models import load_source
    if a.windows < 1 or a.window_len < 2:
        raise ValueError(f"need --windows >= 1 and --window-len >= 2, got {a.windows} and {a.window_len}")
    m = load(a.artifact, fast=not a.reference, device=a.device, compile=a.compile)
    text = Path(a.text_file).read_text(encoding="utf-8") if a.text_file else britannica_text()
    tokens = eval_tokens(m.tokenizer, text, a.windows * a.window_len)
    rows = []
    if a.compare_float:
        src = load_source(m.manifest["model"]["path"])
        flat = FlatTokenModule(src.model)
        t0 = time.perf_counter()
        rows.append(("float (source model, eager)", perplexity(flat, tokens, a.window_len, not a.quiet, "float"),
                     time.perf_counter() - t0))
    t0 = time.perf_counter()
    name, fn, kv = m.manifest["target"]["name"], m.flat, None
    if a.kv_cache_dtype is not None:
        kv = kv_cache_dtype_of(m.manifest, a.kv_cache_dtype)
        kv_name = next(k for k, v in KV_CACHE_DTYPES.items() if v == kv)  # "auto" resolved
        fn = m.chunked(kv, a.prefill_chunk)
        name += f", {kv_name} KV cache"
    rows.append((f"{name} (artifact)", perplexity(fn, tokens, a.window_len, not a.quiet, name), time.perf_counter() - t0))
    print(f"\n{a.artifact}: {m.manifest['target']['name']}, passes as compiled")
    print_pass_checks(m.manifest)
    print(f"\nperplexity, {a.windows} windows x {a.window_len} tokens of "
          f"{a.text_file or 'the bundled Britannica article'}"
          + (f", prefilled {a.prefill_chunk} tokens a chunk" if kv is not None else "") + ":")
    for label, ppl, secs in rows:
        print(f"  {label:<30} {ppl:8.3f}   ({secs:.0f} s)")
    if len(rows) == 2:
        print(f"  {'change':<30} {100 * (rows[1][1] / rows[0][1] - 1):+7.2f}%")
    if a.json:
        rec = {"artifact": str(a.artifact), "target": m.manifest["target"]["name"], "perplexity": round(rows[-1][1], 4),
               "tokens": int(tokens.numel()), "windows": a.windows, "window_len": a.window_len,
               "kv_cache_dtype": None if kv is None else kv_name,
               "prefill_chunk": None if kv is None else a.prefill_chunk, "seconds": round(rows[-1][2], 1)}
        if len(rows) == 2:
            rec["float_perplexity"] = round(rows[0][1], 4)
        print(json.dumps(rec))
    return 0


def cmd_generate(a) -> int:
    from . import LLM, SamplingParams
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            seed=a.seed, stop=tuple(a.stop))
    llm = LLM(a.artifact, device=a.device, compile=a.compile, kv_cache_dtype=a.kv_cache_dtype)
    prompt = a.prompt
    if a.chat:
        if llm.tokenizer is None or not getattr(llm.tokenizer, "chat_template", None):
            raise ValueError(f"{a.artifact}: the tokenizer has no chat template")
        prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
    t0 = time.perf_counter()
    if a.beam_width is not None:
        return _beam_search(a, llm, prompt, t0)
    if a.stream:
        it = llm.stream(prompt, params)
        try:
            while True:
                print(next(it), end="", flush=True)
        except StopIteration as stop:
            out = stop.value
        print()
    else:
        out = llm.generate([prompt], params)[0]
        print(out.text)
    if out.error:
        raise ValueError(out.error)
    secs = time.perf_counter() - t0
    rate = f"{secs:.1f} s with the compile" if a.compile == "jit" else f"{len(out.token_ids) / secs:.1f} tok/s"
    print(f"[{len(out.token_ids)} tokens, {out.finish_reason}, {rate}]", file=sys.stderr)
    return 0


def _beam_search(a, llm, prompt, t0: float) -> int:
    from . import BeamSearchParams
    if a.stream or a.temperature or a.seed is not None or a.top_p != 1.0 or a.top_k:
        raise ValueError("--beam-width is deterministic and prints at the end: drop --stream and the sampling options")
    out = llm.beam_search([prompt], BeamSearchParams(beam_width=a.beam_width, max_tokens=a.max_tokens,
                                                     length_penalty=a.length_penalty, stop=tuple(a.stop)))[0]
    if out.error:
        raise ValueError(out.error)
    for i, s in enumerate(out.sequences):
        print(f"[{i}] score {s.score:.4f}, {len(s.token_ids)} tokens, {s.finish_reason}: {s.text}")
    print(f"[beam width {a.beam_width}, {time.perf_counter() - t0:.1f} s, KV blocks saved by sharing "
          f"{100 * llm.stats()['beam_kv_saved']:.0f}%]", file=sys.stderr)
    return 0


def cmd_report(a) -> int:
    from .report import build_report, draw_report, report_text
    rep = build_report(a.artifact)
    out = Path(a.output) if a.output else rep.path.resolve().with_name(f"{rep.path.resolve().name}-report.png")
    if out.suffix.lower() != ".png":
        raise ValueError(f"--output must name a .png file, got {out}")
    print(report_text(rep))
    print(f"picture: {draw_report(rep, out)}")
    return 0
