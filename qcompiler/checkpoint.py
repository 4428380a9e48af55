"""A compressed-tensors checkpoint (a Hugging Face directory whose ``quantization_config`` says
``compressed-tensors``, as llm-compressor and ``qcompile export`` write it) as a model source: the
float model its codes decode to, and the codes themselves in the canonical layout, which the
compile keeps exactly (method ``checkpoint``) instead of quantizing again.

Read: ``pack-quantized`` int4/int8 weights per group or channel, symmetric or with zero points
(weight-only, or int8 weights with dynamic per-token int8 activations); ``int-quantized`` int8
weights with dynamic per-token int8 activations; ``float-quantized`` e4m3 weights per channel with
dynamic per-token e4m3 activations. One scheme for every quantized linear, except int4 linears
with an int8 symmetric per-channel lm_head (``qcompile``'s w4a16 default). Anything else (group
activation order with ``g_idx``, static activation scales, block or tensor strategies, 4-bit
floats, other mixtures) is refused with one line."""
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from qcompiler.codegen.quant import QuantizedWeight, dequantize_weight_ref, pack_int4

from .targets import FP8, W4A16, W8A8, W8A16, Target


@dataclass
class CheckpointCodes:
    target: Target                       # the scheme the codes follow, method "checkpoint" (or "qat")
    codes: dict[str, QuantizedWeight]    # module name -> its codes, canonical layout
    record: Optional[dict] = None        # for the manifest: how the codes were made (a QAT run)


def quantization_config(path: Path) -> Optional[dict]:
    """The directory's compressed-tensors ``quantization_config``, or None."""
    cfg = json.loads((path / "config.json").read_text())
    q = cfg.get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == "compressed-tensors" else None


def unpack_from_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of ``export.pack_to_int32``: the ``n`` signed int8 codes along ``dim``."""
    if dim == 0:
        return unpack_from_int32(packed.t(), bits, n, 1).t().contiguous()
    rows = packed.shape[0]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.nn.functional.pad(words, (0, -words.shape[1] % bits)).reshape(rows, -1, bits)
    words = torch.cat([words, torch.zeros_like(words[..., :1])], -1)  # a zero word past each run
    shift = torch.arange(32, dtype=torch.int64) * bits
    lo = torch.gather(words, 2, (shift // 32).expand(rows, words.shape[1], 32)) >> (shift % 32)
    hi = torch.gather(words, 2, (shift // 32 + 1).expand(rows, words.shape[1], 32)) << (32 - shift % 32)
    u = (lo | hi) & ((1 << bits) - 1)
    return (u.reshape(rows, -1)[:, :n] - (1 << (bits - 1))).to(torch.int8)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(p == name or p == "Linear" or (p.startswith("re:") and re.match(p[3:], name)) for p in patterns)


def _scheme(group: dict) -> tuple[str, int, Optional[int], bool]:
    """(target name, bits, group size or None, symmetric) of one config group; refuses the rest."""
    w, a, fmt = group.get("weights") or {}, group.get("input_activations"), group.get("format")
    def no(why):
        raise ValueError(f"compressed-tensors scheme not supported ({why}): {json.dumps(group, sort_keys=True)}")
    if w.get("actorder") not in (None, "static", "weight") or w.get("dynamic"):
        no("weights with a dynamic order or scale")
    strategy, bits = w.get("strategy"), w.get("num_bits")
    if strategy not in ("group", "channel"):
        no(f"weight strategy {strategy!r}")
    gs = w.get("group_size") if strategy == "group" else None
    if a is not None and not (a.get("dynamic") is True and a.get("strategy") == "token" and a.get("num_bits") == 8
                              and a.get("symmetric", True)):
        no("activations other than dynamic per-token 8-bit")
    if w.get("type") == "float":
        if bits != 8 or strategy != "channel" or (a is not None and a.get("type") != "float"):
            no("float weights other than fp8 per channel with fp8 activations")
        return "fp8", 8, None, True
    if w.get("type") != "int" or bits not in (4, 8):
        no(f"{w.get('type')} weights of {bits} bits")
    if a is not None:
        if bits != 8 or strategy != "channel" or not w.get("symmetric", True) or a.get("type") != "int":
            no("int8 activations with other than symmetric int8 weights per channel")
        return "w8a8", 8, None, True
    if fmt not in (None, "pack-quantized"):
        no(f"weight-only format {fmt!r}")
    return ("w4a16" if bits == 4 else "w8a16"), bits, gs, bool(w.get("symmetric", True))


def read_checkpoint(path: Path, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> CheckpointCodes:
    """Decodes every quantized linear of ``model`` from ``tensors`` (the directory's safetensors):
    sets its weight to the float the codes stand for and returns the codes. The rest of
    ``tensors`` is left for the caller."""
    q = quantization_config(path)
    groups = [(g, _scheme(g)) for g in q["config_groups"].values()]
    ignore = q.get("ignore") or []
    kinds = {}  # module name -> (kind, bits, group size, symmetric)
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or _matches(name, [p for p in ignore if p != "Linear"]):
            continue
        hit = next((s for g, s in groups if _matches(name, g.get("targets") or [])), None)
        if hit is not None:
            kinds[name] = hit
    target, codes, modules = _target(path, kinds, _head_name(model)), {}, dict(model.named_modules())
    for name, (kind, bits, _, sym) in kinds.items():
        mod = modules[name]
        qw = codes[name] = _decode(tensors, name, kind, bits, sym, mod.weight.shape)
        with torch.no_grad():
            mod.weight.copy_(dequantize_weight_ref(qw.qweight, qw.scales, qw.zeros, bits).to(mod.weight.dtype))
    return CheckpointCodes(target, codes)


def _head_name(model: torch.nn.Module) -> Optional[str]:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is out), None) if out is not None else None


def _target(path: Path, kinds: dict[str, tuple], head: Optional[str]) -> Target:
    """The scheme of the decoded linears: one weight scheme, or int4 weights with the output
    projection in int8 per channel, symmetric (``W4A16(lm_head_bits=8)``, as ``qcompile`` writes
    it); other mixtures are refused."""
    int8_head = (head in kinds and kinds[head][:3] == ("w8a16", 8, None) and kinds[head][3]
                 and {k for n, (k, *_) in kinds.items() if n != head} == {"w4a16"})
    body = {n: s for n, s in kinds.items() if not (int8_head and n == head)}
    names = {s[0] for s in body.values()}
    if len(names) != 1:
        raise ValueError(f"{path}: {'no' if not names else 'mixed'} quantized linears ({', '.join(sorted(names))}): "
                         "one weight scheme per checkpoint is supported (int4 with an int8 lm_head too)")
    kind = names.pop()
    if kind in ("w4a16", "w8a16"):
        sizes, syms = {s[2] for s in body.values()}, {s[3] for s in body.values()}
        return (W4A16 if kind == "w4a16" else W8A16)(
            group_size=sizes.pop() if len(sizes) == 1 else "auto", symmetric=syms == {True}, method="checkpoint",
            **({"lm_head_bits": 8} if int8_head else {}))
    return W8A8(method="checkpoint", smoothquant_alpha=None) if kind == "w8a8" else FP8(method="checkpoint")


def _decode(t: dict, name: str, kind: str, bits: int, symmetric: bool, shape) -> QuantizedWeight:
    def get(k):
        if f"{name}.{k}" not in t:
            raise ValueError(f"the checkpoint has no {name}.{k} for its {kind} scheme")
        return t.pop(f"{name}.{k}")
    N, K = shape
    scale = get("weight_scale").float().reshape(N, -1)
    if kind in ("w8a8", "fp8"):
        return QuantizedWeight(get("weight"), scale, None)
    q = unpack_from_int32(get("weight_packed"), bits, K)
    t.pop(f"{name}.weight_shape", None)
    zeros = None if symmetric else unpack_from_int32(get("weight_zero_point"), bits, N, dim=0).reshape(N, -1)
    return QuantizedWeight(pack_int4(q) if bits == 4 else q, scale, zeros)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no .safetensors files")
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def load_model(path: Path, dtype: Optional[torch.dtype]):
    """(the float model, its tokenizer or None, the checkpoint's codes)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(path)
    del cfg.quantization_config  # built float; the codes come back through the compile
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32, attn_implementation="sdpa")
    tensors = load_tensors(path)
    ck = read_checkpoint(path, model, tensors)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    decoded = {f"{n}.weight" for n in ck.codes}
    missing = [k for k in missing if k not in decoded and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: the tensors do not match {type(model).__name__}: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    from .models import tokenizer_in
    return model, tokenizer_in(path), ck

