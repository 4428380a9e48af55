"""``qcompile``: compile a model to an artifact (the default action), or evaluate one."""
import argparse
import logging
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

from .run_cli import add_compile_option, cmd_eval, cmd_generate, cmd_report, print_pass_checks
from .targets import LM_HEAD_MAX_INCREASE, TARGETS

SUBCOMMANDS = ("compile", "eval", "export", "generate", "qat", "report", "serve")
PER_CHANNEL = "channel"  # --group-size channel: one group per output channel
DESCRIPTION = """Compile a PyTorch language model into a quantized artifact, or evaluate one.

  qcompile MODEL --target w4a16 [-o DIR]     compile (same as: qcompile compile MODEL ...): int4 weights,
                                             per layer in groups of 128, 64 or 32 (the largest that
                                             divides its input size) with integer zero points, ranges
                                             fit on calibration data when the model has it
  qcompile eval ARTIFACT [--compare-float]   perplexity on the bundled evaluation text
  qcompile generate ARTIFACT "PROMPT"        generate text with the paged runtime
  qcompile report ARTIFACT [-o report.png]   draw an artifact: per-layer error, pass checks, size
  qcompile serve ARTIFACT [--port 8000]      an OpenAI-compatible server (/v1/completions, /v1/chat/completions)
  qcompile export ARTIFACT -o DIR            a compressed-tensors model directory for vLLM and SGLang
  qcompile qat MODEL --target w4a16          quantization-aware training, then compile

MODEL is a model.py defining build_model(), a Hugging Face model directory, or a .gguf file.
Targets:
  float   no quantization: captured, normalized and packaged as is
  w4a16   int4 weights in groups (--group-size, default auto: 128, 64 or 32 per layer), with an integer
          zero point per group (--symmetric: none), 16-bit activations
  w8a16   int8 weights per output channel (or --group-size), 16-bit activations
  w8a8    int8 weights per channel, int8 activations per token; SmoothQuant (alpha 0.8) first
  fp8     e4m3 weights per channel, e4m3 activations per token
Methods (--method): rtn (round to nearest), imatrix (round to nearest, each group's scale and zero
point fit to the weights weighted by their inputs' mean square on calibration data: the w4a16
default when the model has calibration data), gptq (error compensation), awq (activation-aware
scales); gptq and awq also clip each group's range where that lowers the error (--no-clip: off).
imatrix, gptq, awq, SmoothQuant and --observer calibrate on the model file's calibration_texts()
or calibration_data(), or --calib-file.
Embeddings stay float. lm_head: w4a16 makes it int8 per channel where that costs at most 0.5%
perplexity on the calibration data (--lm-head-bits auto, the default), else float; --lm-head-bits 16
keeps it float, 8 makes it int8 always, --quantize-lm-head puts it in the scheme. With an explicit
--group-size, a linear whose input size it does not divide stays float; the manifest records it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        print(f"qcompile: error: {message}", file=sys.stderr)
        sys.exit(2)


def _group_size(s: str):
    if s in (PER_CHANNEL, "auto"):
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer, 'auto' or 'channel', got {s!r}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qcompile", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    c = sub.add_parser("compile", help="compile MODEL into an artifact (the default action)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("model", help="model.py, Hugging Face model directory, or .gguf file")
    c.add_argument("--target", "-t", default=None, help=f"one of {', '.join(TARGETS)} (default w4a16; a "
                                                         "compressed-tensors checkpoint: its own scheme and codes)")
    c.add_argument("--requantize", action="store_true",
                   help="a compressed-tensors checkpoint for another --target: its codes decoded, then quantized again")
    c.add_argument("--group-size", "-g", type=_group_size, default=None,
                   help="input channels per scale: a power of two >= 16 (layers it does not divide stay float); "
                        "'auto' (w4a16 default): per layer, the largest of 128, 64, 32 dividing its input size "
                        "(a layer none divides stays float); "
                        "'channel' (w8a16 default): one scale per output channel")
    sym = c.add_mutually_exclusive_group()
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", default=None,
                     help="integer zero point per group (the w4a16 default)")
    sym.add_argument("--symmetric", dest="symmetric", action="store_true",
                     help="no zero point (the w8a16 default)")
    c.add_argument("--method", default=None, help="weight quantization: auto (w4a16 default: imatrix when the model "
                   "has calibration data, else rtn), imatrix, rtn (w8a16 default), gptq, awq (weight-only "
                   "targets); w8a8 and fp8 take rtn or gptq")
    act = c.add_mutually_exclusive_group()
    act.add_argument("--act-order", dest="act_order", action="store_true", default=None,
                     help="gptq: quantize columns by decreasing activation energy, static groups (gptq's default)")
    act.add_argument("--no-act-order", dest="act_order", action="store_false", help="gptq: columns in order")
    clip = c.add_mutually_exclusive_group()
    clip.add_argument("--clip", dest="clip", action="store_true", default=None,
                      help="w4a16/w8a16: search each group's clipped range (output error on calibration data for "
                      "gptq/awq, where it is the default; weight error for rtn)")
    clip.add_argument("--no-clip", dest="clip", action="store_false", help="w4a16/w8a16: min-max ranges")
    c.add_argument("--smoothquant-alpha", type=float, default=None, help="w8a8: SmoothQuant strength (default 0.8)")
    c.add_argument("--no-smoothquant", action="store_true", help="w8a8: no SmoothQuant")
    c.add_argument("--observer", default=None, help="w8a8: static per-tensor activation scales from this observer "
                   "(minmax, percentile, mse); default: dynamic per-token scales")
    c.add_argument("--calib-samples", type=int, default=None, help="calibration samples (default 64; imatrix 16)")
    c.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")
    c.add_argument("--calib-file", default=None, help="calibrate on this UTF-8 text instead of the model file's")
    c.add_argument("--quantize-lm-head", action="store_true", default=None, help="quantize the output projection too")
    c.add_argument("--lm-head-bits", type=_lm_head_bits, default=None, metavar="8|16|auto",
                   help="w4a16/w8a16: 8 = output projection in int8 per channel (the rest as the scheme says), 16 = "
                        "float (w8a16's default), auto = int8 when it costs at most 0.5%% perplexity on the "
                        "calibration data (w4a16's default)")
    c.add_argument("--dtype", default=None, help="cast the model first: float32, bfloat16 or float16")
    c.add_argument("-o", "--output", default=None, help="artifact directory (default build/<model>-<target>)")
    c.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking each pass on probe inputs (the manifest says so)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.add_argument("--no-aot", dest="aot", action="store_false",
                   help="skip compiling the program for this CPU now (the first run here compiles it instead)")
    e = sub.add_parser("eval", help="perplexity of an artifact on the bundled evaluation text")
    e.add_argument("artifact")
    e.add_argument("--windows", type=int, default=16)
    e.add_argument("--window-len", type=int, default=1024)
    e.add_argument("--text-file", default=None, help="evaluate on this UTF-8 text instead")
    e.add_argument("--compare-float", action="store_true", help="also evaluate the float source model")
    e.add_argument("--reference", action="store_true", help="run the canonical reference ops, not the fast CPU kernels")
    e.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    e.add_argument("--kv-cache-dtype", default=None, metavar="DTYPE",
                   help="auto, float32, bfloat16, float16, int8 or fp8: evaluate as served: prefill each window in chunks into a paged KV cache of this dtype "
                        "(auto: the engine's default), attention reading the cache back (default: one prefill "
                        "a window, the model's dtype)")
    e.add_argument("--prefill-chunk", type=int, default=128, help="tokens per prefill chunk with --kv-cache-dtype "
                                                                  "(default 128)")
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    add_compile_option(e)
    e.add_argument("-q", "--quiet", action="store_true")
    g = sub.add_parser("generate", help="generate text from an artifact (greedy unless --temperature)")
    g.add_argument("artifact")
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the text before this string (repeatable)")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--beam-width", type=int, default=None, metavar="K",
                   help="beam search of width K (transformers' num_beams): prints the K hypotheses, best first")
    g.add_argument("--length-penalty", type=float, default=1.0, help="with --beam-width: scores are cum log-prob / "
                                                                    "length ** this (default 1.0)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--kv-cache-dtype", default="auto", metavar="DTYPE",
                   help="auto (default), float32, bfloat16, float16, int8 or fp8 (quantized: a scale per token and KV head)")
    add_compile_option(g)
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda: Triton kernels and CUDA graphs")
    r = sub.add_parser("report", help="draw an artifact (PNG) and print the same facts")
    r.add_argument("artifact")
    r.add_argument("-o", "--output", default=None, help="PNG path (default: ARTIFACT-report.png beside the artifact)")
    x = sub.add_parser("export", help="write an artifact as a Hugging Face directory in the compressed-tensors "
                                      "format (vLLM, SGLang, transformers load it)")
    x.add_argument("artifact")
    x.add_argument("-o", "--output", required=True, help="a new or empty directory")
    x.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors"])
    from .qat_cli import add_parser as add_qat
    from .server.cli import add_parser
    add_qat(sub)
    add_parser(sub)
    return p


def cmd_export(a) -> int:
    from .export import export_compressed_tensors
    t0 = time.perf_counter()
    q = export_compressed_tensors(a.artifact, a.output)
    groups = ", ".join(f"{g['weights']['num_bits']}-bit {g['weights']['type']} {g['weights']['strategy']}"
                       + (f" {g['weights']['group_size']}" if g['weights']['group_size'] else "")
                       for g in q["config_groups"].values())
    print(f"{a.output}: {q['format']} ({groups}; kept float: {', '.join(q['ignore']) or 'none'}) "
          f"in {time.perf_counter() - t0:.1f} s")
    print(f"  vllm serve {a.output} --tensor-parallel-size N  |  "
          f"python -m sglang.launch_server --model-path {a.output} --tp N")
    return 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_summary(rep, model: str) -> None:
    from .artifact import WEIGHTS
    layers = rep.manifest["layers"]
    q = [v for v in layers.values() if v["status"] == "quantized"]
    kept = {k: v["reason"] for k, v in layers.items() if v["status"] == "float"}
    art = sum(f["bytes"] for f in rep.manifest["files"].values())
    t = rep.manifest["target"]
    print(f"\nqcompile: {model} -> {rep.out}  [{t['name']}{': ' + rep.target.scheme if q or kept else ''}]")
    print(f"  {'layers':<12} {len(q)} quantized, {len(kept)} kept float"
          + (f" ({'; '.join(f'{k}: {r}' for k, r in list(kept.items())[:3])}{' …' if len(kept) > 3 else ''})" if kept else ""))
    grouped = [v for v in q if "group_size" in v]  # w8a8 / fp8 layers are per channel by construction
    if grouped:
        def label(v):  # the target's per-channel layers, and an int8 lm_head (always per channel)
            per_channel = getattr(rep.target, "group_size", 0) is None or v["bits"] != rep.target.bits
            return f"int{v['bits']} per-channel" if per_channel else f"g{v['group_size']}"
        mix = Counter(label(v) for v in grouped)
        print(f"  {'groups':<12} " + ", ".join(f"{g}: {n}" for g, n in mix.most_common()))
    for name, v in layers.items():  # lm_head_bits "auto": what the int8 head was measured to cost
        if v.get("perplexity_increase") is not None:
            kind = f"int{v['bits']} per channel" if v["status"] == "quantized" else "float"
            print(f"  {name:<12} {kind}: int8 costs {v['perplexity_increase']:+.2%} perplexity on the calibration "
                  f"data (limit {LM_HEAD_MAX_INCREASE:.1%})")
    paged = rep.manifest["program"]["paged"]
    windows = paged.get("windows") or [0] * paged["num_layers"]
    cfg = rep.manifest["model"]["config"]
    arch = (cfg.get("architectures") or [cfg.get("model_type") or "custom model"])[0]
    print(f"  {'attention':<12} {arch}: {paged['num_layers']} layers, {paged['num_kv_heads']} KV heads x "
          f"{paged['head_dim']}; " + ", ".join(f"sliding window {w}: {n} layers" if w else f"causal: {n} layers"
                                               for w, n in sorted(Counter(windows).items()))
          + "".join(f"; {x}" for x in _attention_extras(paged, cfg)))
    checks = rep.manifest["model"].get("checks")
    if checks:  # GGUF input: what llama.cpp agreed with
        t, f = checks["tokenizer"], checks.get("float_logits")
        print(f"  {'gguf':<12} tokenizer ({'transformers' if t['tokenizer'] == 'transformers' else 'built from the GGUF metadata'})"
              f" tokenizes as {t['reference']} does ({t['sample_tokens']} sample tokens)"
              + (f"; float logits vs llama.cpp on {f['tokens']} tokens: argmax agrees {f['argmax_agreement']:.0%}, "
                 f"perplexity x{f['ppl_ratio']:.3f}" if f else "; float logits not checked (llama.cpp not installed)"))
    if q:
        n = sum(v["shape"][0] * v["shape"][1] for v in q)
        bits = 8 * sum(_layer_bytes(rep, v) for v in q) / n
        print(f"  {'bits/weight':<12} {bits:.2f} over the quantized linears (scales and zero points included)")
    ratio = art / rep.float_bytes if rep.float_bytes else float("nan")
    print(f"  {'size':<12} float {_mb(rep.float_bytes)} -> artifact {_mb(art)} ({ratio:.2f}x; "
          f"{WEIGHTS} {_mb(rep.manifest['files'][WEIGHTS]['bytes'])})")
    total = sum(rep.stages.values())
    print(f"  {'seconds':<12} " + " · ".join(f"{k.removeprefix('pass:')} {v:.1f}" for k, v in rep.stages.items())
          + f" = {total:.1f}")
    print_pass_checks(rep.manifest)


def _rope_types(cfg: dict) -> list[str]:
    """RoPE variants a transformers config names (``rope_parameters``, per layer type or not;
    ``rope_scaling`` of older configs)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    per_type = rope.values() if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
    return sorted({p.get("rope_type") or p.get("type") or "default" for p in per_type if p})


def _attention_extras(paged: dict, cfg: dict) -> list[str]:
    """What the compile kept besides windows: score and logit soft-caps, the RoPE variant."""
    out = []
    if paged.get("softcaps"):
        out.append("scores soft-capped at " + ", ".join(f"{c:g}" for c in sorted(set(paged["softcaps"]) - {0.0})))
    if cfg.get("final_logit_softcapping"):
        out.append(f"logits soft-capped at {cfg['final_logit_softcapping']:g}")
    rope = _rope_types(cfg)
    if rope:
        out.append("RoPE " + ", ".join(rope))
    return out


def _layer_bytes(rep, v) -> float:
    N, K = v["shape"]
    if "group_size" not in v:  # w8a8 / fp8: 8-bit codes, one fp32 scale per output channel
        return N * K + N * 4
    groups = N * (K // v["group_size"])
    scale_bytes = {"float32": 4}.get(rep.manifest["model"]["dtype"], 2)
    return N * K * v["bits"] / 8 + groups * (scale_bytes + (0 if v["symmetric"] else 1))


def cmd_compile(a) -> int:
    from .calibration import CalibrationConfig
    from .compiler import compile_model
    from .checkpoint import quantization_config
    from .targets import make_target
    checkpoint = Path(a.model).is_dir() and (Path(a.model) / "config.json").exists() and \
        quantization_config(Path(a.model)) is not None
    if a.target is None and not checkpoint:
        a.target = "w4a16"
    if a.requantize and (not checkpoint or a.target is None):
        raise ValueError("--requantize applies to a compressed-tensors checkpoint compiled for another --target")
    group_size = a.group_size
    if group_size == PER_CHANNEL:
        if a.target != "w8a16":
            raise ValueError(f"--group-size channel applies to w8a16 only; {a.target} takes a power of two >= 16 or 'auto'")
        group_size = None
    if a.no_smoothquant and a.smoothquant_alpha is not None:
        raise ValueError("--smoothquant-alpha and --no-smoothquant exclude each other")
    target = None if a.target is None else make_target(
        a.target, group_size=group_size, symmetric=a.symmetric, method=a.method, quantize_lm_head=a.quantize_lm_head,
        lm_head_bits=a.lm_head_bits, act_order=a.act_order, clip=a.clip, smoothquant_alpha=a.smoothquant_alpha,
        observer=a.observer, no_smoothquant=a.no_smoothquant or None)
    calib = CalibrationConfig(samples=a.calib_samples, seq_len=a.calib_seq_len, file=a.calib_file)
    out = a.output or f"build/{Path(a.model).stem.lower()}-{a.target or 'checkpoint'}"
    rep = compile_model(a.model, target, out, dtype=a.dtype, progress=not a.quiet, calibration=calib,
                        verify=a.verify, requantize=a.requantize)
    print_summary(rep, a.model)
    if a.aot:
        _build_for_this_cpu(rep.out)
    return 0


def _build_for_this_cpu(out) -> None:
    """The program compiled ahead of time for this CPU and the engine's default KV cache, so that
    the first ``generate``/``serve`` here starts in seconds (``qcompiler.aot``); skipped where
    the default mode is not "aot" (``QCOMPILER_COMPILE``)."""
    import torch

    from .llm import kv_cache_dtype_of
    from .loader import load, resolve_mode
    if resolve_mode("auto", torch.device("cpu")) != "aot":
        return
    m = load(out, compile="aot", verify=False)
    t0 = time.perf_counter()
    m.program_for(kv_cache_dtype_of(m.manifest, "auto"))
    rec = m.lowerings[-1]
    if rec["name"] == "aot":
        print(f"  compiled ahead of time for this CPU in {time.perf_counter() - t0:.0f} s "
              f"(cached in {Path(rec['params']['package']).parent})")


def _lm_head_bits(value: str):
    if value not in ("8", "16", "auto"):
        raise argparse.ArgumentTypeError(f"must be 8, 16 or auto, got {value!r}")
    return value if value == "auto" else int(value)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "compile")
    a = build_parser().parse_args(argv)
    if a.command is None:
        build_parser().print_help()
        return 2
    # torch/transformers deprecation chatter is not the user's concern
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="No complete tensor found")
    logging.basicConfig(format="qcompile: %(levelname)s: %(message)s", level=logging.INFO)
    logging.getLogger("qcompiler").setLevel(logging.INFO)
    from .artifact import ArtifactError
    try:
        from .qat_cli import cmd_qat
        from .server.cli import cmd_serve
        return {"compile": cmd_compile, "eval": cmd_eval, "export": cmd_export, "generate": cmd_generate,
                "qat": cmd_qat, "report": cmd_report, "serve": cmd_serve}[a.command](a)
    except (ValueError, OSError, ArtifactError) as e:
        if os.environ.get("QCOMPILE_DEBUG"):
            raise
        print(f"qcompile: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qcompile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
