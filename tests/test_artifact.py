"""Artifact round trip through the API, and every way a damaged artifact must fail: with one
clear message naming the file."""
import json
import shutil

import pytest
import torch

import qcompiler
from qcompiler.artifact import MANIFEST, PROGRAM, WEIGHTS, ArtifactError
from qcompiler.codegen import cpu_native, ops
from qcompiler.codegen.cpu import DIRECT
from qcompiler.compiler import compile_model
from qcompiler.models import load_source
from qcompiler.targets import W4A16, W8A16, Float
from reference import fake_quant_model, fake_quant_ref
from tests_paths import FIXTURES

qc, aten = torch.ops.qc, torch.ops.aten


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "plain-w4a16"
    src = load_source(str(FIXTURES / "plain_lm.py"))
    rep = compile_model(src, W4A16(group_size=32, symmetric=False), out)
    return out, src, rep


def test_roundtrip_equals_pipeline_and_source_convention(artifact):
    out, src, rep = artifact
    ref_model = fake_quant_model(src.model, 4, 32, False, skip=("out",))
    m = qcompiler.load(out, fast=False)
    for T in (1, 2, 13, 40):
        ids, pos = torch.randint(0, 96, (T,)), torch.arange(5, 5 + T)
        with torch.no_grad():
            ref = ref_model(input_ids=ids[None], position_ids=pos[None])[0]
        torch.testing.assert_close(m.flat(ids, pos), ref, rtol=1e-4, atol=1e-4)
    ids = torch.randint(0, 96, (2, 7))
    y = m(input_ids=ids, position_ids=torch.arange(7).expand(2, 7))
    assert y.shape == (2, 7, 96)
    with torch.no_grad():  # each row of a batch is its own sequence
        ref = ref_model(input_ids=ids[1:], position_ids=torch.arange(7)[None])[0]
    torch.testing.assert_close(y[1], ref, rtol=1e-4, atol=1e-4)
    fast = qcompiler.load(out)  # int4pack CPU kernels: bf16 activations
    err = (fast.flat(ids[0], torch.arange(7)) - y[0]).abs().max()
    assert err < 2e-2 * y[0].abs().max()


def test_manifest_records_scheme_layers_and_files(artifact):
    out, _, rep = artifact
    man = json.loads((out / MANIFEST).read_text())
    assert man["target"] == {"name": "w4a16", "group_size": 32, "symmetric": False, "method": "rtn",
                             "quantize_lm_head": False, "act_order": False, "clip": False, "lm_head_bits": None}
    assert [p["name"] for p in man["passes"]] == ["normalize", "quantize_weights", "fuse_weight_only",
                                                  "paged_attention"]
    assert man["program"]["paged"] == {"num_layers": 2, "num_kv_heads": 1, "head_dim": 16}
    assert man["layers"]["layers.0.wq"]["status"] == "quantized"
    assert man["layers"]["layers.0.w2"]["status"] == "quantized"
    assert man["layers"]["out"]["status"] == "float"
    assert set(man["files"]) == {WEIGHTS, PROGRAM} and man["torch_version"] == torch.__version__
    # the program file holds no weights: they are in weights.safetensors only
    stored = torch.export.load(out / PROGRAM).state_dict
    assert stored and all(t.untyped_storage().nbytes() <= t.element_size() for t in stored.values())


def test_load_records_the_lowerings_that_ran(artifact):
    """A CPU load records every lowering it ran, in order, with its seconds, and the program shows
    each one's effect; ``fast=False`` runs none; under ``torch.compile`` the last one traces through."""
    out = artifact[0]
    m = qcompiler.load(out)
    assert [r["name"] for r in m.lowerings] == ["build_cpu_kernels", "lower_for_cpu", "float_linears_to_bf16",
                                                "hoist_constants", "call_directly"]
    assert all(set(r) == {"name", "params", "seconds"} and isinstance(r["seconds"], float) and r["seconds"] >= 0
               for r in m.lowerings)
    nodes = list(m.program.graph.nodes)
    targets = {n.target for n in nodes if n.op == "call_function"}
    assert qc.w4a16_linear.default not in targets and aten.linear.default not in targets
    assert ops.linear_bf16 in targets and targets & set(DIRECT.values())
    assert all(n.target.startswith("_c") for n in nodes if n.op == "get_attr")
    assert qcompiler.load(out, fast=False).lowerings == []
    assert [r["name"] for r in qcompiler.load(out, compile="jit").lowerings][-1] == "trace_through"


def _damaged(artifact, tmp_path):
    src = artifact[0]
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_missing_file(artifact, tmp_path):
    d = _damaged(artifact, tmp_path)
    (d / WEIGHTS).unlink()
    with pytest.raises(ArtifactError, match=f"{WEIGHTS}: missing"):
        qcompiler.load(d)


def test_truncated_file(artifact, tmp_path):
    d = _damaged(artifact, tmp_path)
    data = (d / PROGRAM).read_bytes()
    (d / PROGRAM).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=f"{PROGRAM}: .* bytes, the manifest says .*truncated"):
        qcompiler.load(d)


def test_tampered_file(artifact, tmp_path):
    d = _damaged(artifact, tmp_path)
    data = bytearray((d / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (d / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{WEIGHTS}: SHA-256 does not match"):
        qcompiler.load(d)


def test_version_mismatch(artifact, tmp_path):
    d = _damaged(artifact, tmp_path)
    man = json.loads((d / MANIFEST).read_text())
    man["format_version"] = 99
    (d / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="format version 99 .*recompile"):
        qcompiler.load(d)


def test_missing_manifest_and_not_a_dir(artifact, tmp_path):
    d = _damaged(artifact, tmp_path)
    (d / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="manifest.json: missing"):
        qcompiler.load(d)
    with pytest.raises(ArtifactError, match="no such artifact"):
        qcompiler.load(tmp_path / "nope")


def test_w8a16_per_channel_roundtrip(tmp_path):
    src = load_source(str(FIXTURES / "plain_lm.py"))
    out = tmp_path / "w8"
    compile_model(src, W8A16(symmetric=False), out)
    ids, pos = torch.randint(0, 96, (6,)), torch.arange(6)
    ref, fast = qcompiler.load(out, fast=False), qcompiler.load(out)
    kernel = "wq_linear_native" if cpu_native.available() else "w8a16_linear_cpu"
    assert any(kernel in str(n.target) for n in fast.program.graph.nodes)
    y = ref.flat(ids, pos)
    assert (fast.flat(ids, pos) - y).abs().max() < 2e-2 * y.abs().max()


def test_float_target_equals_eager(tmp_path):
    src = load_source(str(FIXTURES / "plain_lm.py"))
    out = tmp_path / "float"
    rep = compile_model(src, Float(), out)
    assert rep.manifest["layers"] == {}
    assert [p["name"] for p in rep.manifest["passes"]] == ["normalize", "paged_attention"]
    m = qcompiler.load(out)
    ids, pos = torch.randint(0, 96, (11,)), torch.arange(11)
    with torch.no_grad():
        ref = src.model(input_ids=ids[None], position_ids=pos[None])[0]
    torch.testing.assert_close(m.flat(ids, pos), ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_model_keeps_its_dtype(tmp_path):
    src = load_source(str(FIXTURES / "plain_lm.py"), dtype="bfloat16")
    out = tmp_path / "bf16"
    compile_model(src, W4A16(group_size=32), out)
    m = qcompiler.load(out)
    assert json.loads((out / MANIFEST).read_text())["model"]["dtype"] == "bfloat16"
    ids, pos = torch.randint(0, 96, (5,)), torch.arange(5)
    y = m.flat(ids, pos)
    with torch.no_grad():
        ref = fake_quant_model(src.model, 4, 32, True, skip=("out",))(input_ids=ids[None], position_ids=pos[None])[0]
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref.float()).abs().max() < 3e-2 * ref.float().abs().max()


def test_bare_parameter_linears_and_dict_output(tmp_path):
    src = load_source(str(FIXTURES / "bare_param_lm.py"))
    rep = compile_model(src, W8A16(), tmp_path / "bare")
    layers = rep.manifest["layers"]
    assert layers["w_in"]["status"] == layers["w_out"]["status"] == "quantized"
    ids, pos = torch.randint(0, 64, (6,)), torch.arange(6)
    with torch.no_grad():
        ref = fake_quant_model(src.model, 8, None, True, skip=("head",))
        for name in ("w_in", "w_out"):  # bare parameters: fake-quantize them by hand
            getattr(ref, name).copy_(fake_quant_ref(getattr(src.model, name), 8, None, True))
        expect = ref(input_ids=ids[None], position_ids=pos[None])["logits"][0]
    torch.testing.assert_close(qcompiler.load(tmp_path / "bare", fast=False).flat(ids, pos), expect,
                               rtol=1e-4, atol=1e-4)


def test_recompile_replaces_an_artifact_and_incomplete_manifest_fails(artifact, tmp_path):
    d = _damaged(artifact, tmp_path)
    (d / "stale.txt").write_text("left from before")
    compile_model(load_source(str(FIXTURES / "plain_lm.py")), W8A16(), d)  # an artifact: replaced whole
    assert not (d / "stale.txt").exists() and json.loads((d / MANIFEST).read_text())["target"]["name"] == "w8a16"
    man = json.loads((d / MANIFEST).read_text())
    del man["files"][PROGRAM]
    (d / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="file list is missing or incomplete"):
        qcompiler.load(d)
