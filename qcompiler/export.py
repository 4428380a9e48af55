"""An artifact as a Hugging Face model directory in the compressed-tensors format, the format
llm-compressor writes and vLLM and SGLang load (with tensor and pipeline parallelism).

    qcompile export ARTIFACT --format compressed-tensors -o DIR

Exact: the tensors are the artifact's own codes, scales and zero points, in compressed-tensors'
layout (the bytes its compressors write for the same quantized weights); whatever the passes
folded (AWQ and SmoothQuant scales into norms and linears, GPTQ's order) is already in them.

- W4A16 / W8A16 -> ``pack-quantized``: ``weight_packed`` int32 (32 consecutive input channels
  in ``bits`` words, each code at bit ``bits * i`` as ``q + 2 ** (bits - 1)``), ``weight_scale``
  ``[N, groups]``, ``weight_zero_point`` packed the same way along the output channels (asymmetric
  only), ``weight_shape``.
- W8A8 -> ``int-quantized``: int8 ``weight`` and ``weight_scale [N, 1]``; activations int8 per token,
  dynamic (or per tensor with the artifact's static ``input_scale``).
- FP8 -> ``float-quantized``: e4m3 ``weight`` and ``weight_scale [N, 1]``; activations e4m3 per
  token, dynamic.

Only what the format states exactly is written; anything else is refused with one line."""
import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .artifact import WEIGHTS, read_manifest

FORMATS = ("compressed-tensors",)
SHARD_BYTES = 5 << 30  # as transformers' save_pretrained: past this, model-0000i-of-0000n.safetensors
PREFIX = "model."      # the capture wrapper's prefix on every constant name


class ExportError(ValueError):
    """An artifact the format cannot hold exactly: the message says what and why."""


def pack_to_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed codes ``q`` (int8, in [-2**(bits-1), 2**(bits-1))) packed along ``dim`` into int32:
    each run of 32 codes fills ``bits`` words, code ``i`` at bit ``bits * i`` (a code may span two
    words), stored as ``q + 2**(bits-1)``; the last run is padded with zeros and cut to
    ``ceil(n * bits / 32)`` words. compressed-tensors' ``pack_to_int32`` layout."""
    if dim == 0:
        return pack_to_int32(q.t(), bits, 1).t().contiguous()
    rows, n = q.shape
    u = (q.to(torch.int64) + (1 << (bits - 1))).clamp(0, (1 << bits) - 1)
    u = torch.nn.functional.pad(u, (0, -n % 32)).reshape(rows, -1, 32)
    shift = torch.arange(32, dtype=torch.int64) * bits
    words = torch.zeros(rows, u.shape[1], bits + 1, dtype=torch.int64)  # one spare word for spans
    words.scatter_add_(2, (shift // 32).expand(rows, u.shape[1], 32), (u << (shift % 32)) & 0xFFFFFFFF)
    words.scatter_add_(2, (shift // 32 + 1).expand(rows, u.shape[1], 32), u >> (32 - shift % 32))
    words = words[..., :bits].reshape(rows, -1)[:, :-(-n * bits // 32)]
    return (words - ((words >> 31) << 32)).to(torch.int32).contiguous()  # two's complement


def _weight_args(layer: dict, target: str) -> tuple[dict, Optional[dict], str]:
    """compressed-tensors' (weights, input_activations, format) for one quantized layer."""
    bits, group = layer.get("bits", 8), layer.get("group_size")
    if target in ("w4a16", "w8a16"):
        grouped = group is not None and group < layer["shape"][1]
        w = {"num_bits": bits, "type": "int", "symmetric": layer["symmetric"],
             "strategy": "group" if grouped else "channel", "group_size": group if grouped else None}
        return w, None, "pack-quantized"
    if target == "w8a8":
        w = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "group_size": None}
        static = layer.get("input_scale") is not None
        a = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor" if static else "token",
             "dynamic": not static}
        return w, a, "int-quantized"
    if target == "fp8":
        w = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel", "group_size": None}
        return w, {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}, \
            "float-quantized"
    raise ExportError(f"target {target!r} has no compressed-tensors form here (w4a16, w8a16, w8a8, fp8)")


def _args(d: Optional[dict]) -> Optional[dict]:
    if d is None:
        return None
    return {"num_bits": d["num_bits"], "type": d["type"], "symmetric": d["symmetric"],
            "group_size": d.get("group_size"), "strategy": d["strategy"], "block_structure": None,
            "dynamic": d.get("dynamic", False), "actorder": None, "observer": None if d.get("dynamic") else "minmax",
            "observer_kwargs": {}}


def _targets(names: list[str], everyone: list[str]) -> list[str]:
    """Module-name targets for ``names``: ``Linear`` when they are every quantized linear, else
    one pattern per final name component that only ``names`` have, else the names themselves."""
    if sorted(names) == sorted(everyone):
        return ["Linear"]
    leaf = lambda n: n.rsplit(".", 1)[-1]  # noqa: E731
    mine, others = {leaf(n) for n in names}, {leaf(n) for n in everyone if n not in names}
    if not mine & others:
        return [f"re:(.*\\.)?{re.escape(s)}$" for s in sorted(mine)]
    return sorted(names)


def _expected_keys(config: dict) -> tuple[set[str], Optional[str], Optional[str], set[str]]:
    """The state-dict keys of the source architecture (built on the meta device), the keys of its
    input and output embeddings, and its buffers (persistent or not)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    key = lambda m: f"{names[id(m)]}.weight" if m is not None and id(m) in names else None  # noqa: E731
    return set(model.state_dict()), key(emb), key(head), {n for n, _ in model.named_buffers()}


def export_compressed_tensors(artifact: str | Path, out: str | Path, shard_bytes: int = SHARD_BYTES) -> dict:
    """Writes ``out`` (a Hugging Face model directory); returns its ``quantization_config``."""
    art, out = Path(artifact), Path(out)
    man = read_manifest(art)
    hf = man["model"].get("hf")
    if not hf:
        raise ExportError(f"{art}: its source ({man['model']['source']} {man['model']['path']}) is not a transformers "
                          "model, or the artifact predates export: compressed-tensors needs a Hugging Face "
                          "architecture; recompile from a transformers model")
    target = man["target"]["name"]
    config = dict(hf["config"])
    weights = {k.removeprefix(PREFIX): v for k, v in load_file(art / WEIGHTS).items()}
    expected, emb, head, buffers = _expected_keys(config)
    quantized = {n: L for n, L in man["layers"].items() if L["status"] == "quantized"}
    head_module = head.rsplit(".", 1)[0] if head else None
    if config.get("tie_word_embeddings") and emb and head:
        # one tensor under two names; the program keeps one of them
        if emb not in weights and head in weights:
            weights[emb] = weights[head]
        if emb in weights and (head_module in quantized or not torch.equal(weights.get(head, weights[emb]),
                                                                          weights[emb])):
            config["tie_word_embeddings"] = False  # a quantized (or different) head is a module of its own
    tensors, groups = {}, {}
    for name, layer in quantized.items():
        if f"{name}.weight" not in expected:
            raise ExportError(f"{art}: quantized layer {name} is not a module of {config['architectures'][0]}")
        w, a, fmt = _weight_args(layer, target)
        groups.setdefault((json.dumps(w, sort_keys=True), json.dumps(a, sort_keys=True), fmt), []).append(name)
        tensors.update(_layer_tensors(weights, name, layer, target))
    parts = {f"{n}.{p}" for n in quantized for p in ("qweight", "scales", "zeros", "weight_scale", "input_scale")}
    stray = sorted(set(weights) - expected - buffers - parts - {emb, head})
    if stray:  # a constant a pass left outside the weights (a runtime scale): the format has no place for it
        raise ExportError(f"{art}: holds {stray[0]}, which {config['architectures'][0]} has no place for: "
                          "this artifact cannot be exported exactly")
    for key in sorted(expected):
        module = key.rsplit(".", 1)[0]
        if module in quantized and key.endswith(".weight"):
            continue
        if key == head and config.get("tie_word_embeddings"):
            continue  # tied: the embeddings serve
        if key not in weights:
            raise ExportError(f"{art}: has no tensor for {key} of {config['architectures'][0]}; this artifact's "
                              "weights do not map onto its source architecture")
        tensors[key] = weights[key]
    everyone, fmts = sorted(quantized), {g[2] for g in groups}
    qconfig = {
        "quant_method": "compressed-tensors",
        "format": fmts.pop() if len(fmts) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": {"targets": _targets(names, everyone), "weights": _args(json.loads(w)),
                                         "input_activations": _args(json.loads(a)), "output_activations": None,
                                         "format": fmt}
                          for i, ((w, a, fmt), names) in enumerate(groups.items())},
        "ignore": sorted({k.rsplit(".", 1)[0] for k in expected if k.endswith(".weight") and
                          _is_linear_name(k, man) and k.rsplit(".", 1)[0] not in quantized}),
        "kv_cache_scheme": None,
    }
    config.update(quantization_config=qconfig, use_cache=True)
    _write(out, config, hf.get("generation_config"), tensors, art, man, shard_bytes)
    return qconfig


def _is_linear_name(key: str, man: dict) -> bool:
    """A float linear the format must be told to leave alone: a layer the manifest lists, or the head."""
    module = key.rsplit(".", 1)[0]
    return module in man["layers"] or module == "lm_head"


def _layer_tensors(weights: dict, name: str, layer: dict, target: str) -> dict:
    def get(k):
        t = weights.get(f"{name}.{k}")
        if t is None:
            raise ExportError(f"the artifact has no {name}.{k}: recompile it with this qcompiler")
        return t
    if target in ("w4a16", "w8a16"):
        bits = layer["bits"]
        q = get("qweight")
        if bits == 4:
            from qcompiler.codegen.quant import unpack_int4
            q = unpack_int4(q)
        out = {f"{name}.weight_packed": pack_to_int32(q, bits), f"{name}.weight_scale": get("scales"),
               f"{name}.weight_shape": torch.tensor(list(q.shape))}
        if not layer["symmetric"]:
            out[f"{name}.weight_zero_point"] = pack_to_int32(get("zeros"), bits, dim=0)
        return out
    out = {f"{name}.weight": get("qweight"), f"{name}.weight_scale": get("weight_scale")}
    if layer.get("input_scale") is not None:
        out[f"{name}.input_scale"] = get("input_scale").reshape(1)
    return out


def _write(out: Path, config: dict, generation: Optional[dict], tensors: dict, art: Path, man: dict,
           shard_bytes: int) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty directory: choose a new or empty one")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
    shards, size = [[]], 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    if len(shards) == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    else:
        index = {}
        for i, keys in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: tensors[k] for k in keys}, out / fname, metadata={"format": "pt"})
            index.update({k: fname for k in keys})
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if generation:
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True))
    for f in (man.get("tokenizer") or {}).get("files", []):
        shutil.copy2(art / f, out / f)
