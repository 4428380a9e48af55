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


def logits_pair(art, out, vocab=1024):
    ids = torch.randint(0, vocab, (1, 48), generator=torch.Generator().manual_seed(0))
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
    head = json.loads((art / "manifest.json").read_text())["layers"]["lm_head"]["status"]
    assert cfg["ignore"] == ([] if head == "quantized" else ["lm_head"])  # w4a16's int8 head where cheap
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


# --- in: checkpoints compressed-tensors wrote ----------------------------------------------------

INT = dict(type="int", dynamic=False)
SCHEMES = {
    "w4a16-g32-asym": (dict(num_bits=4, symmetric=False, strategy="group", group_size=32, **INT), None),
    "w4a16-g64-sym": (dict(num_bits=4, symmetric=True, strategy="group", group_size=64, **INT), None),
    "w8a16-channel": (dict(num_bits=8, symmetric=True, strategy="channel", **INT), None),
    "w8a8": (dict(num_bits=8, symmetric=True, strategy="channel", **INT),
             dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)),
    "fp8": (dict(num_bits=8, type="float", symmetric=True, strategy="channel"),
            dict(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)),
}
FORMATS = {"w8a8": "int-quantized", "fp8": "float-quantized"}


def ct_checkpoint(out, key):
    """The tiny Llama quantized and saved by compressed-tensors itself (its qparams, its compressor)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    from tests_paths import EXAMPLES
    from qcompiler.models import load_source
    model = load_source(str(EXAMPLES / "tiny_llama.py")).model
    w_args, a_args = SCHEMES[key]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**w_args),
                                input_activations=QuantizationArgs(**a_args) if a_args else None)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for mod in model.modules():
        if hasattr(mod, "weight_scale"):
            args = mod.quantization_scheme.weights
            w = mod.weight.detach()
            wg = w.reshape(w.shape[0], -1, args.group_size or w.shape[1])
            s, z = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
            mod.weight_scale.data.copy_(s.reshape(mod.weight_scale.shape))
            if hasattr(mod, "weight_zero_point"):
                mod.weight_zero_point.data.copy_(z.reshape(mod.weight_zero_point.shape))
    comp = ModelCompressor.from_pretrained_model(model, quantization_format=FORMATS.get(key, "pack-quantized"))
    comp.compress_model(model)
    model.save_pretrained(out)
    comp.update_config(out)
    return out


@pytest.mark.parametrize("key", list(SCHEMES))
def test_a_compressed_tensors_checkpoint_compiles_with_its_own_codes(tmp_path, key):
    """Compiled with no target: the checkpoint's scheme, its codes kept (method ``checkpoint``); the
    artifact gives transformers' logits for it and serves."""
    from qcompiler import LLM, SamplingParams
    from qcompiler.compiler import compile_model
    ck = ct_checkpoint(tmp_path / "ct", key)
    assert main([str(ck), "-q", "-o", str(tmp_path / "art")]) == 0
    man = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert man["target"]["name"] == key.split("-")[0] and man["target"]["method"] == "checkpoint"
    assert [n for n, L in man["layers"].items() if L["status"] != "quantized"] == ["lm_head"]
    ours, theirs = logits_pair(tmp_path / "art", ck)
    # W8A8: transformers quantizes activations at absmax/127.5 per token, our op (as vLLM's) at /127
    assert sqnr(ours, theirs) >= (30 if key == "w8a8" else 40), sqnr(ours, theirs)
    out = LLM(tmp_path / "art").generate([[5, 17, 300, 42]], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    with pytest.raises(ValueError, match="checkpoint .*--requantize"):
        compile_model(str(ck), qcompiler.make_target("w8a8" if key != "w8a8" else "w4a16"), tmp_path / "other")


def test_round_trip_keeps_every_tensor_bit_for_bit(tiny_artifacts, tmp_path):
    """artifact -> export -> qcompile of the export: the same weights, bit for bit, for every target."""
    from qcompiler.compiler import compile_model
    for key in ("w4a16", "w4a16-gptq", "w8a16", "w8a8", "fp8"):
        art = tiny_artifacts[1][key].out
        export_compressed_tensors(art, tmp_path / f"{key}-ct")
        rep = compile_model(str(tmp_path / f"{key}-ct"), None, tmp_path / f"{key}-again", verify=False)
        a, b = load_file(art / "weights.safetensors"), load_file(rep.out / "weights.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a), key


def test_requantize_and_unsupported_schemes(tmp_path, caplog):
    from qcompiler.compiler import compile_model
    ck = ct_checkpoint(tmp_path / "ct", "w4a16-g32-asym")
    rep = compile_model(str(ck), qcompiler.make_target("w8a16"), tmp_path / "re", requantize=True, verify=False)
    assert rep.manifest["target"]["method"] == "rtn" and "quantized again" in caplog.text
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
    (ck / "config.json").write_text(json.dumps(cfg))
    assert main([str(ck), "-q", "-o", str(tmp_path / "bad")]) == 1


@pytest.mark.parametrize("lm_head_bits", [None, 8])
def test_tied_embeddings(tmp_path, lm_head_bits):
    """A model whose lm_head is the embedding table (the program keeps one name for both): a float
    head stays tied; an int8 head becomes a quantized module of its own, the table float."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qcompiler.compiler import compile_model
    from qcompiler.models import ModelSource, hf_checkpoint_facts  # noqa: F401
    from qcompiler.targets import W4A16
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                         attn_implementation="sdpa", use_cache=False)).eval()
    src = ModelSource(model=model, kind="hf", path="tied", config=model.config.to_dict())
    rep = compile_model(src, W4A16(method="rtn", lm_head_bits=lm_head_bits), tmp_path / "art", verify=False)
    qcfg = export_compressed_tensors(rep.out, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    written = load_file(tmp_path / "ct" / "model.safetensors")
    assert cfg["tie_word_embeddings"] == (lm_head_bits is None)
    assert ("lm_head.weight_packed" in written) == (lm_head_bits == 8) and "lm_head.weight" not in written
    assert torch.equal(written["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert qcfg["ignore"] == ([] if lm_head_bits else ["lm_head"])
    ours, theirs = logits_pair(rep.out, tmp_path / "ct", vocab=256)
    assert sqnr(ours, theirs) >= 40, sqnr(ours, theirs)
    # and back: int4 layers with an int8 head are one scheme to qcompile, every tensor kept
    again = compile_model(str(tmp_path / "ct"), None, tmp_path / "again", verify=False)
    assert again.manifest["target"]["lm_head_bits"] == lm_head_bits
    a, b = load_file(rep.out / "weights.safetensors"), load_file(again.out / "weights.safetensors")
    if lm_head_bits:  # the table the tied program knew by the head's name is the embeddings' own now
        a["model.model.embed_tokens.weight"] = a.pop("model.lm_head.weight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if lm_head_bits:  # an int8 linear anywhere but the head is a mixture qcompile does not take
        cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
        groups = cfg["quantization_config"]["config_groups"]
        int8 = next(g for g in groups.values() if g["weights"]["num_bits"] == 8)
        int8["targets"] = ["lm_head", "re:.*down_proj$"]
        (tmp_path / "ct" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="mixed quantized linears"):
            compile_model(str(tmp_path / "ct"), None, tmp_path / "mixed", verify=False)


def test_a_large_export_is_sharded(tiny_artifacts, tmp_path):
    """Past ``shard_bytes`` the tensors go to model-0000i-of-0000n files with an index, as
    transformers writes them; both transformers and ``qcompile`` read them back."""
    from qcompiler.compiler import compile_model
    art = tiny_artifacts[1]["w4a16-gptq"].out
    export_compressed_tensors(art, tmp_path / "ct", shard_bytes=200_000)
    shards = sorted(p.name for p in (tmp_path / "ct").glob("*.safetensors"))
    index = json.loads((tmp_path / "ct" / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    ours, theirs = logits_pair(art, tmp_path / "ct")
    assert sqnr(ours, theirs) >= 40
    again = compile_model(str(tmp_path / "ct"), None, tmp_path / "again", verify=False)
    a, b = load_file(art / "weights.safetensors"), load_file(again.out / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_constant_the_format_cannot_hold_is_refused(tiny_artifacts, tmp_path, monkeypatch):
    """A tensor outside the architecture's weights (a pass's runtime scale) is not silently dropped."""
    import qcompiler.export as ex
    real = ex.load_file
    monkeypatch.setattr(ex, "load_file", lambda p: {**real(p), "model.model.layers.0.act_scale": torch.ones(128)})
    with pytest.raises(ExportError, match="act_scale, which LlamaForCausalLM has no place for"):
        export_compressed_tensors(tiny_artifacts[1]["w8a8"].out, tmp_path / "x")
    assert not (tmp_path / "x").exists()
