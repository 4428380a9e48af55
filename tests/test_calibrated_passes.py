"""Calibrated passes on random small Llama-like models: SmoothQuant and AWQ leave the float
program unchanged; GPTQ (on every layer) and imatrix (in total) beat RTN and their codes are stored as they are;
W8A8 and FP8 programs equal an independent fake-quant reference; observers; calibration data."""
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from qcompiler.calibration import CalibrationConfig, draw_samples, load_calibration
from qcompiler.compiler import resolve_method
from qcompiler.capture import capture
from qcompiler.codegen.fx import call_nodes, set_constant
from qcompiler.codegen.quant import dequantize_weight_ref
from qcompiler.models import ModelSource
from qcompiler.passes import awq, fuse_weight_only, gptq, imatrix, normalize, quantize_fp8, quantize_w8a8, quantize_weights, smoothquant
from qcompiler.passes.quantize_activations import observe_scale
from qcompiler.targets import W4A16, W8A8, W8A16
from test_passes import _eager, _inputs, small_models
from tiny_models import Args, build

qc = torch.ops.qc


def _samples(vocab: int, n: int = 4, T: int = 48, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (T,), generator=g) for _ in range(n)]


def _layers(gm, key):
    return {k: v[key] for k, v in gm.meta.get("qc_layers", {}).items() if key in v}


def _with_outliers(model, seed: int):
    """Input channels of very different scale, as real activations have (norm weights spread out)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("n1.weight", "n2.weight")):
                p.mul_(torch.exp(2 * torch.randn(p.shape, generator=g)))
    return model


@given(small_models(), st.sampled_from(["smoothquant", "awq"]), st.floats(0.3, 0.9), st.integers(0, 2**16))
def test_scale_migration_keeps_the_float_program(m, method, alpha, seed):
    """In float64, so that only a changed function (not fp32 rounding, which the outlier scales
    amplify) can exceed the tolerance."""
    a, model = m
    model = _with_outliers(model, seed).double()
    gm = normalize(capture(model, max_tokens=256))
    ids, pos = _inputs(a.vocab, 12, seed)
    with torch.no_grad():
        before = gm(ids, pos)
    samples = _samples(a.vocab, seed=seed)
    if method == "smoothquant":
        gm = smoothquant(gm, samples, alpha=alpha)
        expected = {"wq", "wk", "wv", "w1", "w3"}  # norm -> q/k/v and norm -> gate/up
    else:
        gm = awq(gm, samples, bits=4, group_size=32, symmetric=False, clip=False)  # clipping changes W
        expected = {"wq", "wk", "wv", "w1", "w3", "w2"}  # and up -> down
    done = {k: v for k, v in _layers(gm, method).items() if "into" in v}  # a site found, a scale folded
    assert {k.rsplit(".", 1)[-1] for k in done} == expected
    assert len(done) == len(expected) * a.n_layers
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, pos), before, rtol=1e-9, atol=1e-9)
        assert torch.allclose(gm(ids, pos), _eager(model, ids, pos), rtol=1e-9, atol=1e-9)


def test_scale_migration_moves_the_outliers():
    """After SmoothQuant (alpha 0.5) the q/k/v input's channel ranges are evened out."""
    a = Args(vocab=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, hidden=64)
    model = _with_outliers(build(a, seed=1), seed=1)
    gm = normalize(capture(model, max_tokens=256))
    samples = _samples(a.vocab)
    norm = lambda: next(v for k, v in [*gm.named_parameters(), *gm.named_buffers()] if k.endswith("layers.0.n1.weight"))  # noqa: E731
    w0 = norm().clone()
    gm = smoothquant(gm, samples, alpha=0.5)
    w1 = norm()
    spread = lambda w: float(w.detach().abs().max() / w.detach().abs().min())  # noqa: E731
    assert spread(w1) < spread(w0) / 4


@pytest.mark.parametrize("bits,group,symmetric,act_order", [(4, 32, True, False), (4, 32, False, False),
                                                            (4, 32, True, True), (8, None, True, False)])
def test_gptq_beats_rtn_on_every_layer_and_its_codes_are_kept(bits, group, symmetric, act_order):
    a = Args(vocab=64, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, hidden=96)
    model = _with_outliers(build(a, seed=3), seed=3)
    gm = normalize(capture(model, max_tokens=256))
    gm = gptq(gm, _samples(a.vocab, n=6, T=64), bits=bits, group_size=group, symmetric=symmetric, act_order=act_order)
    ids, pos = _inputs(a.vocab, 16, 0)
    with torch.no_grad():
        calibrated = gm(ids, pos)  # weights are GPTQ's dequantized ones now
    codes = gm.meta["qc_codes"]
    assert len(codes) == 7 * a.n_layers
    recs = [rec for _, rec in codes.values()]
    assert all(r["output_mse"] <= r["rtn_output_mse"] for r in recs)
    assert sum(r["output_mse"] for r in recs) < 0.9 * sum(r["rtn_output_mse"] for r in recs)
    gm = fuse_weight_only(quantize_weights(gm, bits=bits, group_size=group, symmetric=symmetric))
    assert len(call_nodes(gm, qc.w4a16_linear.default if bits == 4 else qc.w8a16_linear.default)) == 7 * a.n_layers
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, pos), calibrated, rtol=1e-4, atol=1e-4)
    assert all(v.get("method") == "gptq" for k, v in gm.meta["qc_layers"].items() if v["status"] == "quantized")


@pytest.mark.parametrize("symmetric", [True, False])
def test_imatrix_beats_rtn_and_its_codes_are_kept(symmetric):
    """imatrix leaves the float program alone while it calibrates, lowers the output error of RTN on
    calibration inputs in total, and the quantized program computes exactly its codes."""
    a = Args(vocab=64, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, hidden=96)
    model = _with_outliers(build(a, seed=4), seed=4)
    gm = normalize(capture(model, max_tokens=256))
    ids, pos = _inputs(a.vocab, 16, 0)
    with torch.no_grad():
        before = gm(ids, pos)
    gm = imatrix(gm, _samples(a.vocab, n=6, T=64), bits=4, group_size=32, symmetric=symmetric)
    codes = gm.meta["qc_codes"]
    assert len(codes) == 7 * a.n_layers
    recs = [rec for _, rec in codes.values()]
    assert sum(r["output_mse"] for r in recs) < 0.9 * sum(r["rtn_output_mse"] for r in recs)
    with torch.no_grad():
        assert torch.equal(gm(ids, pos), before)
        for name, (qw, _) in codes.items():  # the reference: each weight replaced by its dequantized codes
            set_constant(gm, name, dequantize_weight_ref(qw.qweight, qw.scales, qw.zeros, 4).to(before.dtype))
        expected = gm(ids, pos)
    gm = fuse_weight_only(quantize_weights(gm, bits=4, group_size=32, symmetric=symmetric))
    assert len(call_nodes(gm, qc.w4a16_linear.default)) == 7 * a.n_layers
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, pos), expected, rtol=1e-4, atol=1e-4)
    assert all(v.get("method") == "imatrix" for v in gm.meta["qc_layers"].values() if v["status"] == "quantized")


def _fake_quant_linears(model, weight_q, act_q):
    """The eager model with every linear but the output one computing act_q(x) @ weight_q(W)ᵀ."""
    def patched(lin):
        def forward(x):
            return F.linear(act_q(x), weight_q(lin.weight), lin.bias)
        return forward
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "out":
            mod.forward = patched(mod)
    return model


def _int8_weight(w):  # per output channel, absmax / 127.5, codes in [-128, 127]
    s = w.abs().amax(1, keepdim=True) / 127.5
    return (w / s).round().clamp(-128, 127) * s


def _int8_tokens(x):  # per token, absmax / 127, codes in [-127, 127]
    s = x.abs().amax(-1, keepdim=True) / 127
    return (x / s).round().clamp(-127, 127) * s


def _fp8(t, dim):
    s = t.abs().amax(dim, keepdim=True) / 448
    return (t / s).to(torch.float8_e4m3fn).float() * s


@pytest.mark.parametrize("target", ["w8a8", "fp8"])
def test_activation_quantized_programs_equal_reference(target):
    a = Args(vocab=64, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, hidden=96, bias=True)
    model = build(a, seed=5)
    gm = normalize(capture(model, max_tokens=256))
    ids, pos = _inputs(a.vocab, 10, 1)
    if target == "w8a8":
        gm = quantize_w8a8(gm)
        ref = _fake_quant_linears(build(a, seed=5), _int8_weight, _int8_tokens)
        op = qc.w8a8_linear.default
    else:
        gm = quantize_fp8(gm)
        ref = _fake_quant_linears(build(a, seed=5), lambda w: _fp8(w, 1), lambda x: _fp8(x, -1))
        op = qc.fp8_linear.default
    assert len(call_nodes(gm, op)) == 7 * a.n_layers
    with torch.no_grad():
        out, expect = gm(ids, pos), _eager(ref, ids, pos)
    torch.testing.assert_close(out, expect, rtol=1e-3, atol=1e-3 * float(expect.abs().max()))


def test_static_activation_scales_from_observers():
    a = Args(vocab=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, hidden=64)
    gm = normalize(capture(build(a, seed=2), max_tokens=256))
    gm = quantize_w8a8(gm, _samples(a.vocab), observer="minmax")
    nodes = call_nodes(gm, qc.w8a8_linear.default)
    assert all(n.args[4] is not None for n in nodes)  # a static input scale each
    scales = {k: v["input_scale"] for k, v in gm.meta["qc_layers"].items() if "input_scale" in v}
    assert scales["layers.0.wq"] == scales["layers.0.wk"] == scales["layers.0.wv"]  # one input, one scale


def test_observers():
    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    x[7, 3] = 100.0  # one outlier
    assert observe_scale(x, "minmax") == pytest.approx(100.0 / 127)
    assert observe_scale(x, "percentile") < 10 / 127  # the outlier is clipped
    err = lambda s: float(((x / s).round().clamp(-127, 127) * s - x).pow(2).mean())  # noqa: E731
    mse = err(observe_scale(x, "mse"))  # the best clip of its grid: better than no clipping and than the percentile
    assert mse < 0.8 * err(observe_scale(x, "minmax")) and mse < err(observe_scale(x, "percentile"))


def test_calibration_protocol_and_sources(tmp_path):
    tokens = torch.arange(10_000)
    got = draw_samples(tokens, 64, 512, seed=0)
    rng = random.Random(0)
    starts = [rng.randrange(10_000 - 512 + 1) for _ in range(64)]
    assert [int(s[0]) for s in got] == starts and all(s.numel() == 512 for s in got)

    class Tok:
        def __call__(self, text):
            return {"input_ids": [ord(c) % 50 for c in text]}

    src = ModelSource(model=None, kind="model.py", path="m.py", tokenizer=Tok(), calibration_texts=lambda: ["ab" * 600])
    cal = load_calibration(src, CalibrationConfig(samples=3, seq_len=100))
    assert cal.source == "calibration_texts()" and len(cal.samples) == 3 and len(cal.sha256) == 64
    f = tmp_path / "c.txt"
    f.write_text("xyz" * 100)
    cal_f = load_calibration(src, CalibrationConfig(samples=2, seq_len=50, file=str(f)))
    assert cal_f.source == str(f) and cal_f.sha256 != cal.sha256
    data = ModelSource(model=None, kind="model.py", path="m.py", calibration_data=lambda: [torch.ones(1, 40).long()])
    assert load_calibration(data, CalibrationConfig(samples=2, seq_len=512)).samples[0].numel() == 40
    with pytest.raises(ValueError, match="needs calibration data"):
        load_calibration(ModelSource(model=None, kind="model.py", path="m.py"), CalibrationConfig())
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_calibration(ModelSource(model=None, kind="model.py", path="m.py", calibration_texts=lambda: ["a"]),
                         CalibrationConfig())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        load_calibration(src, CalibrationConfig(samples=1, seq_len=10), vocab_size=10)


def test_auto_method_is_imatrix_given_calibration_data_else_rtn(tmp_path, caplog):
    """The w4a16 default method calibrates when the source (or --calib-file) has data, and says so
    when it falls back to plain RTN; explicit methods are kept as they are."""
    texts = ModelSource(model=None, kind="model.py", path="m.py", calibration_texts=lambda: ["a"])
    data = ModelSource(model=None, kind="model.py", path="m.py", calibration_data=lambda: [torch.ones(1, 8).long()])
    bare = ModelSource(model=None, kind="model.py", path="m.py")
    cfg = CalibrationConfig()
    assert resolve_method(W4A16(), texts, cfg).method == "imatrix"
    assert resolve_method(W4A16(), data, cfg).method == "imatrix"
    assert resolve_method(W4A16(), bare, CalibrationConfig(file=str(tmp_path / "c.txt"))).method == "imatrix"
    with caplog.at_level("WARNING", logger="qcompiler"):
        plain = resolve_method(W4A16(group_size=64), bare, cfg)
    assert plain == W4A16(group_size=64, method="rtn") and "no calibration data" in caplog.text
    for explicit in (W4A16(method="rtn"), W4A16(method="gptq"), W8A16(), W8A8()):
        assert resolve_method(explicit, texts, cfg) == explicit
    with pytest.raises(ValueError, match="searches its ranges itself"):
        W4A16(clip=True)
    assert CalibrationConfig(samples=3).samples_for("imatrix") == CalibrationConfig(samples=3).samples_for("gptq") == 3
    from qcompiler.pipeline import passes_for  # a pipeline run directly resolves "auto" by its samples
    assert "imatrix" not in [p.name for p in passes_for(W4A16())]
    assert "imatrix" in [p.name for p in passes_for(W4A16(), samples=[torch.ones(4).long()])]


@pytest.mark.parametrize("method", ["imatrix", "gptq"])
def test_calibrated_codes_and_an_int8_lm_head_in_one_program(method):
    """The lm_head pass runs before ``quantize_weights`` and leaves the calibrated codes to it."""
    from qcompiler.pipeline import run_pipeline
    a = Args(vocab=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, hidden=96)
    res = run_pipeline(capture(build(a, seed=6), max_tokens=128),
                       W4A16(group_size=32, method=method, lm_head_bits=8), samples=_samples(a.vocab))
    layers = res.layers
    assert layers["out"]["status"] == "quantized" and layers["out"]["bits"] == 8
    inner = {k: v for k, v in layers.items() if k != "out"}
    assert len(inner) == 7 and all(v["bits"] == 4 and v["method"] == method for v in inner.values())
