"""``qcompile export --format compressed-tensors`` checked by the peers themselves: the directory
loads with stock transformers + compressed-tensors, its logits match the artifact's reference
program, and every quantized layer's tensors are the bytes compressed-tensors' own compressors
write for the same quantized weights and parameters."""
import json

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import qcompiler
from qcompiler.cli import main
from qcompiler.codegen.quant import dequantize_weight_ref
from qcompiler.export import ExportError, export_compressed_tensors, pack_to_int32
from test_engine import artifact  # noqa: F401  (the plain PyTorch model, compiled)

WEIGHT_ONLY = ["w4a16", "w4a16-rtn", "w4a16-gptq", "w4a16-awq", "w8a16"]
ACTIVATIONS = ["w8a8", "w8a8-smoothquant", "fp8"]


def sqnr(ref, x):
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum()))


def logits_pair(art, out):
    ids = torch.randint(0, 1024, (1, 48), generator=torch.Generator().manual_seed(0))
    ours = qcompiler.load(art, fast=False)(ids, torch.arange(48)[None])[0]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        theirs = model(ids).logits[0]
    return ours.float(), theirs.float()


@pytest.mark.parametrize("key", WEIGHT_ONLY + ACTIVATIONS)
def test_transformers_loads_the_export_and_gives_our_logits(tiny_artifacts, tmp_path, key):
    art = tiny_artifacts[1][key].out
    assert main(["export", str(art), "-o", str(tmp_path / "ct")]) == 0
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["quantization_status"] == "compressed"
    assert cfg["ignore"] == ["lm_head"]
    ours, theirs = logits_pair(art, tmp_path / "ct")
    # weight-only: the same weights, fp32 arithmetic on both sides; W8A8/FP8: transformers' CPU path
    # runs the decompressed weights on unquantized activations, so only the activation error differs
    assert sqnr(ours, theirs) >= (40 if key in WEIGHT_ONLY else 20), sqnr(ours, theirs)


@pytest.mark.parametrize("key", WEIGHT_ONLY + ACTIVATIONS)
def test_tensors_are_what_compressed_tensors_writes(tiny_artifacts, tmp_path, key):
    art = tiny_artifacts[1][key].out
    qcfg = export_compressed_tensors(art, tmp_path / "ct")
    ours = load_file(tmp_path / "ct" / "model.safetensors")
    weights = {k.removeprefix("model."): v for k, v in load_file(art / "weights.safetensors").items()}
    man = json.loads((art / "manifest.json").read_text())
    checked = 0
    for group in qcfg["config_groups"].values():
        scheme = QuantizationScheme(**group)
        compressor = BaseCompressor.load_from_registry(group["format"])
        for name, layer in man["layers"].items():
            if layer["status"] != "quantized" or not _targeted(name, group["targets"]):
                continue
            if group["format"] == "pack-quantized":
                w = dequantize_weight_ref(weights[f"{name}.qweight"], weights[f"{name}.scales"],
                                          weights.get(f"{name}.zeros"), layer["bits"])
                state = {"weight": w, "weight_scale": weights[f"{name}.scales"]}
                if f"{name}.zeros" in weights:
                    state["weight_zero_point"] = weights[f"{name}.zeros"]
            else:
                scale = weights[f"{name}.weight_scale"]
                state = {"weight": weights[f"{name}.qweight"].float() * scale, "weight_scale": scale}
            for k, v in compressor.compress(state, scheme).items():
                mine = ours[f"{name}.{k}"]
                assert mine.dtype == v.dtype and mine.shape == v.shape and torch.equal(mine, v), (name, k)
            checked += 1
    assert checked == sum(L["status"] == "quantized" for L in man["layers"].values()) > 0


def _targeted(name, targets):
    import re
    return any(t == "Linear" or (t.startswith("re:") and re.match(t[3:], name)) or t == name for t in targets)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [32, 64, 40])
def test_pack_to_int32_is_compressed_tensors_layout(bits, cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32 as theirs
    g = torch.Generator().manual_seed(cols)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (24, cols), generator=g, dtype=torch.int8)
    for dim in (0, 1):
        assert torch.equal(pack_to_int32(q, bits, dim), theirs(q, bits, packed_dim=dim))


def test_refusals(tiny_artifacts, artifact, tmp_path, capsys):
    """A plain PyTorch source has no architecture to name; a non-empty directory is not overwritten."""
    art = tiny_artifacts[1]["w4a16"].out
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="not an empty directory"):
        export_compressed_tensors(art, tmp_path / "full")
    plain = artifact[0]
    assert main(["export", str(plain), "-o", str(tmp_path / "plain")]) == 1
    err = capsys.readouterr().err.strip()
    assert "not a transformers model" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "plain").exists()
