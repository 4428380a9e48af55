"""Translation validation (``qcompiler.verify``): every pass of every target is checked on probe
inputs and recorded; the recorded figures are the artifact's own; an exact pass that changes the
program fails the compile with one line; a probe runs past any declared attention window."""
import json
import math
import sys

import pytest
import torch

from qcompiler.calibration import load_calibration
from qcompiler.capture import capture, max_tokens_of
from qcompiler.artifact import MANIFEST
from qcompiler.cli import main
from qcompiler.loader import load
from qcompiler.pipeline import PIPELINES, Pass
from qcompiler.targets import Float
from qcompiler.codegen.quant import sqnr_db
from qcompiler.verify import declared_window, make_probes, run_program
from conftest import CALIB, TARGETS
from tests_paths import EXAMPLES

aten = torch.ops.aten
CHECK_KEYS = {"probe_tokens", "max_abs_err", "sqnr_db", "sqnr_db_vs_float", "seconds"}
WINDOWED_MODEL = '''
import torch
from transformers import MistralConfig, MistralForCausalLM

def build_model():
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=144, attn_implementation="sdpa", use_cache=False)
    return MistralForCausalLM(cfg)
'''


@pytest.mark.parametrize("key", TARGETS)
def test_every_pass_is_checked_and_recorded(tiny_artifacts, key):
    _, reports = tiny_artifacts
    m = reports[key].manifest
    ver = m["verification"]
    assert ver["enabled"] and ver["tokens"] == sum(ver["sequences"]) >= 128
    names = [r["name"] for r in m["passes"]]
    assert names[0] == "normalize" and names[-1] == "paged_attention"
    for rec in m["passes"]:
        c = rec["check"]
        assert CHECK_KEYS <= set(c) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in c.values())
        assert c["probe_tokens"] == ver["tokens"]
        # only an exact pass is held to a bound: max |Δ|, or once activations are rounded an SQNR
        assert ("tolerance" in c or "tolerance_sqnr_db" in c) == rec["exact"], rec
    lossy = [r for r in m["passes"] if not r["exact"]]
    if key == "float":
        assert not lossy
    else:  # the quantizing pass is where the outputs move, and its error is what reaches the end
        assert {r["name"] for r in m["passes"] if r["exact"]} >= {"normalize", "paged_attention"}
        assert min(r["check"]["sqnr_db"] for r in lossy) < 60
        assert m["passes"][-1]["check"]["sqnr_db_vs_float"] < 60


@pytest.mark.parametrize("key", ["float", "w4a16-gptq", "w8a8-smoothquant", "fp8"])
def test_recorded_error_is_the_artifacts(tiny_artifacts, key):
    """Loading the artifact and measuring it against the float model on the same probes gives
    the SQNR the last pass recorded: the manifest describes what was written."""
    src, reports = tiny_artifacts
    m = reports[key].manifest
    samples = load_calibration(src, CALIB, src.config.get("vocab_size")).samples if TARGETS[key].needs_calibration \
        else None
    probes = make_probes(src.config["vocab_size"], max_tokens_of(src.model), None, samples)
    assert list(probes.describe()["sequences"]) == m["verification"]["sequences"]
    ref = run_program(capture(src.model, max_tokens_of(src.model)), probes, torch.float32)
    art = load(reports[key].out, fast=False)
    got = run_program(art.program, probes, torch.float32, paged=m["program"]["paged"])
    assert sqnr_db(ref, got) == pytest.approx(m["passes"][-1]["check"]["sqnr_db_vs_float"], abs=0.05)


def _drop_a_residual_add(gm, hidden: int):
    """A broken rewrite: the first residual add ``h + f(h)`` of the hidden size becomes ``f(h)``."""
    for node in gm.graph.nodes:
        if node.target is aten.add.Tensor and all(isinstance(a, torch.fx.Node) for a in node.args[:2]):
            a, b = (n.meta["val"] for n in node.args[:2])
            if a.dim() == b.dim() == 3 and str(a.shape) == str(b.shape) and a.shape[-1] == hidden:
                node.replace_all_uses_with(node.args[1])
                gm.graph.erase_node(node)
                break
    else:
        raise AssertionError("no residual add found")
    gm.graph.lint()
    gm.recompile()
    return gm


def test_broken_exact_pass_fails_the_compile_in_one_line(monkeypatch, capsys, tmp_path):
    def broken(t, progress, samples, codes):
        return [Pass("drop_residual", lambda gm: _drop_a_residual_add(gm, hidden=128), {}, exact=True)]

    monkeypatch.setitem(PIPELINES, Float, broken)
    out = tmp_path / "broken"
    assert main([str(EXAMPLES / "tiny_llama.py"), "--target", "float", "-q", "-o", str(out)]) == 1
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in cap.err, cap.err
    assert lines[0].startswith("qcompile: error: pass drop_residual changed the program's outputs (max |Δ| ")
    assert not out.exists()
    # --no-verify compiles the same broken program, and the manifest says it was not checked
    assert main([str(EXAMPLES / "tiny_llama.py"), "--target", "float", "-q", "--no-verify", "-o", str(out)]) == 0
    assert "(not checked: --no-verify)" in capsys.readouterr().out
    manifest = load(out, verify=True).manifest
    assert manifest["verification"] == {"enabled": False}
    assert all("check" not in r for r in manifest["passes"])


def test_a_rewrite_that_drops_the_window_fails_the_compile(monkeypatch, capsys, tmp_path):
    """The paged rewrite keeps this model's window (the manifest records it). One that took the
    mask for causal would compile a different program, and only the probe past the declared window
    sees it: the random probes are shorter than this model's window."""
    model = tmp_path / "windowed.py"
    model.write_text(WINDOWED_MODEL)
    assert main([str(model), "--target", "float", "-q", "-o", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / MANIFEST).read_text())["program"]["paged"]["windows"] == [144, 144]
    capsys.readouterr()
    monkeypatch.setattr(sys.modules["qcompiler.passes.paged_attention"], "mask_window", lambda *a: 0)
    assert main([str(model), "--target", "float", "-q", "-o", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qcompile: error: pass paged_attention changed the program's outputs")
    monkeypatch.setattr("qcompiler.compiler.declared_window", lambda config: None)
    assert main([str(model), "--target", "float", "-q", "-o", str(tmp_path / "c")]) == 0


def test_declared_window():
    assert declared_window({}) is None
    assert declared_window({"sliding_window": None, "max_position_embeddings": 4096}) is None
    assert declared_window({"sliding_window": 4096}) == 4096
    assert declared_window({"sliding_window": 512, "attention_chunk_size": 8192}) == 8192
    assert declared_window({"use_sliding_window": False, "sliding_window": 4096}) is None


def test_probes_are_seeded_and_run_past_the_window():
    samples = [torch.arange(200) % 50]
    p = make_probes(100, 1024, window=300, samples=samples)
    lens = [int(s.shape[0]) for s in p.sequences]
    assert max(lens) > 300 and torch.equal(p.sequences[1], samples[0][:lens[1]])
    assert all(int(s.max()) < 100 for s in p.sequences) and 2 <= p.prefix < lens[0]
    assert all(torch.equal(a, b) for a, b in zip(p.sequences, make_probes(100, 1024, 300, samples).sequences))
    assert max(int(s.shape[0]) for s in make_probes(100, 320, window=300).sequences) == 320  # capped
    far = make_probes(100, 256, window=4096)  # a window past max_tokens: no probe can cross it
    assert max(int(s.shape[0]) for s in far.sequences) < 256 and far.past_window is None
    assert p.past_window == 300


def test_a_pass_that_makes_outputs_non_finite_is_named(monkeypatch, capsys, tmp_path):
    def nan_weights(gm):
        node = next(n for n in gm.graph.nodes if n.op == "get_attr" and "q_proj" in n.target)
        getattr(gm.get_submodule(node.target.rsplit(".", 1)[0]), node.target.rsplit(".", 1)[1]).fill_(float("nan"))
        return gm

    monkeypatch.setitem(PIPELINES, Float, lambda t, progress, samples, codes: [Pass("nan_weights", nan_weights, {})])
    assert main([str(EXAMPLES / "tiny_llama.py"), "--target", "float", "-q", "-o", str(tmp_path / "nan")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qcompile: error: pass nan_weights made the program's outputs non-finite (NaN or inf)"]


def test_a_failing_first_check_names_the_capture_when_export_changed_the_model():
    """The float reference is the source model; when the first exact check fails because the
    captured program already differs from it, the error says so instead of blaming the pass."""
    from qcompiler.capture import FlatTokenModule
    from qcompiler.passes import normalize
    from qcompiler.verify import Checker, VerificationError
    from tiny_models import Args, build
    a = Args(vocab=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden=64)
    model, other = build(a, seed=0), build(a, seed=1)
    probes = make_probes(a.vocab, 128)
    ep_other = capture(other, 128)
    with pytest.raises(VerificationError, match="torch.export captured a program whose outputs differ"):
        Checker(FlatTokenModule(model), ep_other, probes, torch.float32).check("normalize", normalize(ep_other), True)
    ep = capture(model, 128)
    rec = Checker(FlatTokenModule(model), ep, probes, torch.float32).check("normalize", normalize(ep), True)
    assert rec["max_abs_err"] <= rec["tolerance"]


def test_after_rounded_activations_an_exact_pass_is_held_to_an_sqnr_margin():
    """Past a pass that quantizes activations, an exact pass may move the logits by more than the
    float tolerance (flipped roundings), but its change must stay ``ROUNDING_MARGIN_DB`` below the
    quantization error; a change as large as that error fails."""
    from qcompiler.verify import ROUNDING_MARGIN_DB, Checker, VerificationError
    from tiny_models import Args, build
    a = Args(vocab=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden=64)
    model, probes = build(a, seed=0), make_probes(a.vocab, 128)

    class Noisy(torch.nn.Module):  # the model's logits plus a fixed pattern of the given amplitude
        def __init__(self, amp):
            super().__init__()
            self.amp = amp

        def forward(self, ids, pos):
            out = model(input_ids=ids[None], position_ids=pos[None])[0]
            return out + self.amp * torch.sin(torch.arange(out.numel()).reshape(out.shape).float())

    checker = Checker(Noisy(0.0), None, probes, torch.float32)
    rec = checker.check("quantize_acts", Noisy(0.3), exact=False, rounds_activations=True)
    q_db = rec["sqnr_db_vs_float"]
    ok = checker.check("reorder", Noisy(0.3 + 0.02), exact=True)  # beyond RTOL, far below the noise
    assert ok["max_abs_err"] > 1e-3 * 10 and ok["sqnr_db"] >= q_db + ROUNDING_MARGIN_DB
    with pytest.raises(VerificationError, match="activations are rounded"):
        checker.check("broken", Noisy(0.9), exact=True)

