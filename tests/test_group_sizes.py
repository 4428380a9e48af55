"""Group sizes per layer: with no ``--group-size`` each linear gets the largest of 128, 64, 32
that divides its input size. One artifact then mixes groups, and every path computes it: the
reference ops, the CPU kernels, the Triton kernels (interpreter on the CPU), save/load, the engine."""
import json

import pytest
import torch

import qcompiler
from qcompiler import LLM, SamplingParams
from qcompiler.artifact import MANIFEST
from qcompiler.cli import main
from qcompiler.codegen.ops import quantized_linear_ref
from qcompiler.codegen.triton_linear import w4a16_linear_triton
from qcompiler.compiler import compile_model
from qcompiler.models import ModelSource
from qcompiler.passes.quantize_weights import layer_group
from qcompiler.targets import W4A16, make_target
from reference import fake_quant_ref
from tiny_models import Args, build

# q/k/v/o and gate/up read 128 channels (g128), down reads 96 (g32)
ARGS = Args(vocab=96, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden=96)
EXPECTED = {"wq": 128, "wk": 128, "wv": 128, "wo": 128, "w1": 128, "w3": 128, "w2": 32}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    model = build(ARGS)
    out = tmp_path_factory.mktemp("groups") / "mixed"
    rep = compile_model(ModelSource(model=model, tokenizer=None, kind="model.py", path="tiny"), W4A16(), out)
    return model, out, rep


def _reference(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every linear but the output fake-quantized at its own group, asymmetric."""
    import copy
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "out":
                mod.weight.copy_(fake_quant_ref(mod.weight, 4, EXPECTED[name.rsplit(".", 1)[-1]], False))
    return ref


def test_layer_group_is_the_largest_that_divides():
    assert [layer_group("auto", K) for K in (576, 1536, 96, 4096, 4160)] == [64, 128, 32, 128, 64]
    assert layer_group(64, 1536) == 64 and layer_group(None, 1536) is None
    assert W4A16().group_size == "auto" and W4A16().symmetric is False
    assert make_target("w8a16").group_size is None and make_target("w8a16").symmetric is True


def test_manifest_records_each_layers_group(mixed):
    _, out, rep = mixed
    layers = json.loads((out / MANIFEST).read_text())["layers"]
    got = {k: v["group_size"] for k, v in layers.items() if v["status"] == "quantized"}
    assert got == {f"layers.{i}.{n}": g for i in range(ARGS.n_layers) for n, g in EXPECTED.items()}
    assert rep.manifest["target"]["group_size"] == "auto"


def test_every_path_computes_the_mixed_artifact(mixed):
    model, out, _ = mixed
    ref_model = _reference(model)
    ids, pos = torch.randint(0, ARGS.vocab, (11,)), torch.arange(11)
    with torch.no_grad():
        ref = ref_model(input_ids=ids[None], position_ids=pos[None])[0]
    exact = qcompiler.load(out, fast=False)  # reference ops, saved and loaded
    torch.testing.assert_close(exact.flat(ids, pos), ref, rtol=1e-4, atol=1e-4)
    fast = qcompiler.load(out)  # CPU kernels, bf16 activations
    assert (fast.flat(ids, pos) - ref).abs().max() < 2e-2 * ref.abs().max()
    assert {r["name"] for r in fast.lowerings} >= {"lower_for_cpu"}


def test_triton_kernel_takes_each_layers_group(mixed, kernel_device):
    _, out, _ = mixed
    ep = qcompiler.load(out, fast=False).program
    consts = dict(ep.named_buffers())
    for name in ("layers.0.wq", "layers.0.w2"):
        q, s, z = (next(v for k, v in consts.items() if k.endswith(f"{name}.{part}")) for part in ("qweight", "scales", "zeros"))
        assert q.shape[1] * 2 // s.shape[1] == EXPECTED[name.rsplit(".", 1)[-1]]
        for M in (1, 5):
            x = torch.randn(M, q.shape[1] * 2, dtype=torch.float16)
            got = w4a16_linear_triton(x.to(kernel_device), *(t.to(kernel_device) for t in (q, s.half(), z)), None)
            torch.testing.assert_close(got.cpu().float(), quantized_linear_ref(x, q, s.half(), z, None, 4).float(),
                                       rtol=1e-2, atol=1e-2)


def test_engine_greedy_equals_the_reference(mixed):
    model, out, _ = mixed
    ref_model = _reference(model)
    llm = LLM(out, kv_cache_dtype="float32")
    prompt = torch.randint(0, ARGS.vocab, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    got = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].token_ids
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            logits = ref_model(input_ids=torch.tensor(ids)[None], position_ids=torch.arange(len(ids))[None])[0, -1]
            ids.append(int(logits.argmax()))
    assert got == ids[len(prompt):]


def test_explicit_group_size_keeps_undivided_layers_float(tmp_path, capsys):
    """An explicit --group-size is taken as given: layers it does not divide stay float."""
    model_py = tmp_path / "m.py"
    model_py.write_text("import sys\nsys.path.insert(0, %r)\nfrom tiny_models import Args, build\n"
                        "def build_model():\n    return build(Args(vocab=96, dim=128, n_layers=1, n_heads=4, "
                        "n_kv_heads=2, hidden=96))\n" % str(__import__("pathlib").Path(__file__).parent))
    assert main([str(model_py), "--group-size", "64", "-q", "-o", str(tmp_path / "a")]) == 0
    summary = capsys.readouterr().out
    assert "6 quantized, 2 kept float" in summary and "input size 96 not divisible by group size 64" in summary
    assert main([str(model_py), "-q", "-o", str(tmp_path / "b")]) == 0
    summary = capsys.readouterr().out
    assert "7 quantized, 1 kept float" in summary and "g128: 6, g32: 1" in summary
