"""Quantization-aware training: the straight-through estimator's gradients, prepare -> convert ->
compile exact for every supported target (weights bit for bit, outputs within float tolerance),
a short run that beats RTN on held-out data, and ``qcompile qat`` with its bad input."""
import json
import logging

import pytest
import torch

from qcompiler import load
from qcompiler.checkpoint import CheckpointCodes
from qcompiler.cli import main
from qcompiler.compiler import compile_model
from qcompiler.models import load_source
from qcompiler.qat import (FakeQuantLinear, convert, fake_quantize, fake_quantize_per_token, prepare, qat_target,
                           sample_sequences, train)
from qcompiler.targets import W4A16, W8A8, W8A16
from safetensors.torch import load_file
from tests_paths import EXAMPLES

TARGETS = {"w4a16-g32-sym": W4A16(group_size=32, symmetric=True, method="rtn"),
           "w4a16-g64-asym": W4A16(group_size=64, symmetric=False, method="rtn"),
           "w8a16": W8A16(), "w8a8": W8A8(smoothquant_alpha=None)}


def test_ste_passes_gradients_inside_the_range_and_none_outside():
    scale, zero = torch.tensor([[0.1]]), torch.tensor([[2]], dtype=torch.int8)
    # 4 bits: codes in [-8, 7]; w / s + z inside for w in [-1.0, 0.5], clamped beyond
    w = torch.tensor([[-2.0, -0.95, -0.31, 0.0, 0.22, 0.44, 0.9, 3.0]], requires_grad=True)
    fake_quantize(w, scale, zero, 4).sum().backward()
    inside = ((w.detach() / 0.1 + 2) >= -8) & ((w.detach() / 0.1 + 2) <= 7)
    assert torch.equal(w.grad, inside.float()) and inside.any() and (~inside).any()
    # finite differences see a step function; the estimator's slope is 1 inside, 0 where clamped
    eps = 1e-3
    fd = (fake_quantize(w.detach() + eps, scale, zero, 4) - fake_quantize(w.detach() - eps, scale, zero, 4)) / (2 * eps)
    assert torch.all(fd[~inside] == 0)
    x = torch.randn(3, 16, requires_grad=True)
    fake_quantize_per_token(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # absmax / 127: every value inside the range


def test_the_scales_gradient_is_the_derivative_with_the_codes_held():
    # weights on their grid, as a PTQ method's codes leave them: round(w / s) - w / s is zero there
    scale, zero = torch.tensor([[0.1, 0.2]], requires_grad=True), torch.tensor([[1, -2]], dtype=torch.int8)
    codes = torch.tensor([[-8, -3, 0, 5, 7, 2, -1, 4]])
    w = (codes - zero.repeat_interleave(4, 1)) * scale.detach().repeat_interleave(4, 1)
    g = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    (fake_quantize(w, scale, zero, 4) * g).sum().backward()
    eps = 1e-3  # moves w / s by at most 0.1: no code changes
    fd = torch.stack([((fake_quantize(w, scale.detach() + d, zero, 4) - fake_quantize(w, scale.detach() - d, zero, 4))
                       * g).sum() / (2 * eps) for d in torch.eye(2)[:, None] * eps]).reshape(1, 2)
    torch.testing.assert_close(scale.grad, fd, rtol=1e-3, atol=1e-4)
    assert (scale.grad.abs() > 0.1).all()


def _ids(n=40, seed=0):
    return torch.randint(0, 1024, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("key", list(TARGETS))
def test_prepare_convert_compile_is_exact(tmp_path, key):
    target = TARGETS[key]
    src = load_source(str(EXAMPLES / "tiny_llama.py"))
    prepare(src.model, target)
    fq = [m for m in src.model.modules() if isinstance(m, FakeQuantLinear)]
    assert len(fq) == 14
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as training would leave them: weights and scales moved
        for m in fq:
            m.weight.add_(0.01 * torch.randn(m.weight.shape, generator=g))
            m.scale.mul_(1.02)
    ids = _ids()
    with torch.no_grad():
        want = src.model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits[0]
    codes = convert(src.model)
    src.checkpoint = CheckpointCodes(qat_target(target), codes)
    rep = compile_model(src, None, tmp_path / "art", verify=False)
    assert rep.manifest["target"]["method"] == "qat"
    weights = {k.removeprefix("model."): v for k, v in load_file(rep.out / "weights.safetensors").items()}
    for name, qw in codes.items():
        stored = weights[f"{name}.qweight"]
        assert stored.dtype == qw.qweight.dtype and torch.equal(stored, qw.qweight), name
        scale = weights[f"{name}.scales" if f"{name}.scales" in weights else f"{name}.weight_scale"]
        assert torch.equal(scale.reshape(qw.scales.shape).float(), qw.scales.float()), name
    got = load(rep.out, fast=False)(ids, torch.arange(ids.shape[1])[None])[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def kl_to_float(teacher, model_fn, ids):
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None]).logits[0], -1)
        s = torch.log_softmax(model_fn(ids), -1)
    return float(torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean"))


def test_a_short_run_lowers_held_out_kd_loss_and_beats_rtn(tmp_path):
    import copy
    target = TARGETS["w4a16-g32-sym"]
    src = load_source(str(EXAMPLES / "tiny_llama.py"))
    teacher = copy.deepcopy(src.model)
    samples = [torch.randint(0, 1024, (64,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    held = _ids(64, seed=100)
    rtn = compile_model(load_source(str(EXAMPLES / "tiny_llama.py")), target, tmp_path / "rtn", verify=False)
    prepare(src.model, target)
    calls = []
    res = train(src.model, teacher, samples, steps=40, lr=1e-4, batch=2, on_step=lambda n, s: calls.append((n, s)))
    assert res.loss_last < res.loss_first and res.tokens == 40 * 2 * 64 and len(res.curve) >= 4
    assert [n for n, _ in calls] == list(range(41))  # before the first step, after every step, with the time so far
    assert all(a <= b for (_, a), (_, b) in zip(calls, calls[1:])) and calls[-1][1] <= res.seconds + 0.1
    src.checkpoint = CheckpointCodes(qat_target(target), convert(src.model))
    qat = compile_model(src, None, tmp_path / "qat", verify=False)
    run = lambda art: (lambda ids: load(art, fast=False)(ids, torch.arange(ids.shape[1])[None])[0])  # noqa: E731
    assert kl_to_float(teacher, run(qat.out), held) < 0.8 * kl_to_float(teacher, run(rtn.out), held)


class _NoCache(torch.nn.Module):
    """The same model, without its KV cache: every prefix recomputed."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids=None):
        return self.model(input_ids=input_ids, position_ids=position_ids)


def test_sampled_training_text_is_reproducible_and_the_same_with_or_without_a_cache():
    model = load_source(str(EXAMPLES / "tiny_llama.py")).model
    seqs = sample_sequences(model, 3, 20, [1], seed=5, batch=2)
    assert len(seqs) == 3 and all(s.shape == (20,) and s[0] == 1 for s in seqs)
    assert len({tuple(s.tolist()) for s in seqs}) == 3
    again = sample_sequences(model, 3, 20, [1], seed=5, batch=2)
    recomputed = sample_sequences(_NoCache(model), 3, 20, [1], seed=5, batch=2)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(seqs, again, recomputed))
    assert not torch.equal(torch.stack(seqs), torch.stack(sample_sequences(model, 3, 20, [1], seed=6, batch=2)))


def test_norms_train_only_when_asked_and_reach_the_artifact(tmp_path):
    import copy
    target = TARGETS["w4a16-g64-asym"]
    samples = [_ids(32, seed=i)[0] for i in range(4)]
    moved = {}
    for vectors in (False, True):
        src = load_source(str(EXAMPLES / "tiny_llama.py"))
        teacher = copy.deepcopy(src.model)
        float_params = dict(teacher.named_parameters())
        prepare(src.model, target)
        train(src.model, teacher, samples, steps=4, lr=1e-3, batch=2, train_vectors=vectors)
        fq = [n + "." for n, m in src.model.named_modules() if isinstance(m, FakeQuantLinear)]
        moved[vectors] = {n for n, p in src.model.named_parameters()  # beyond the quantized linears
                          if n in float_params and not n.startswith(tuple(fq)) and not torch.equal(p, float_params[n])}
    norms = {n for n, p in teacher.named_parameters() if "norm" in n}
    assert len(norms) == 5 and moved[False] == set() and moved[True] == norms
    src.checkpoint = CheckpointCodes(qat_target(target), convert(src.model))
    rep = compile_model(src, None, tmp_path / "art", verify=False)
    stored = {k.removeprefix("model."): v for k, v in load_file(rep.out / "weights.safetensors").items()}
    trained = dict(src.model.named_parameters())
    assert all(torch.equal(stored[n].float(), trained[n].float()) for n in norms)


def test_scales_alone_train_with_the_weights_held():
    import copy
    src = load_source(str(EXAMPLES / "tiny_llama.py"))
    teacher = copy.deepcopy(src.model)
    prepare(src.model, TARGETS["w4a16-g64-asym"])
    fq = [m for m in src.model.modules() if isinstance(m, FakeQuantLinear)]
    weights, scales = [m.weight.clone() for m in fq], [m.scale.clone() for m in fq]
    res = train(src.model, teacher, [_ids(32, seed=i)[0] for i in range(2)], steps=10, lr=1e-3, batch=2,
                train_weights=False)  # the same batch every step: its loss falls
    assert all(torch.equal(m.weight, w) for m, w in zip(fq, weights))
    assert all(not torch.equal(m.scale, s) for m, s in zip(fq, scales)) and res.loss_last < res.loss_first
    held = prepare(load_source(str(EXAMPLES / "tiny_llama.py")).model, TARGETS["w4a16-g64-asym"], learn_scales=False)
    with pytest.raises(ValueError, match="learning rates must be > 0"):
        train(held, teacher, [_ids(32)[0]], steps=1, scale_lr=0.0)
    with pytest.raises(ValueError, match="nothing to train"):
        train(held, teacher, [_ids(32)[0]], steps=1, train_weights=False)


def test_weights_and_scales_move_at_their_own_rates():
    """Adam's first step moves each parameter by at most its group's rate (about that much where
    the gradient is not tiny): the weights by ``lr``, the scales by ``scale_lr``."""
    import copy
    for lr, scale_lr in ((1e-3, 1e-6), (1e-6, 1e-3)):
        src = load_source(str(EXAMPLES / "tiny_llama.py"))
        teacher = copy.deepcopy(src.model)
        prepare(src.model, TARGETS["w4a16-g64-asym"])
        fq = [m for m in src.model.modules() if isinstance(m, FakeQuantLinear)]
        weights, scales = [m.weight.clone() for m in fq], [m.scale.clone() for m in fq]
        train(src.model, teacher, [_ids(32)[0]], steps=1, lr=lr, batch=1, scale_lr=scale_lr)
        dw = max(float((m.weight - w).abs().max()) for m, w in zip(fq, weights))
        ds = max(float((m.scale - s).abs().max()) for m, s in zip(fq, scales))
        assert lr / 2 < dw <= lr * 1.001 and scale_lr / 2 < ds <= scale_lr * 1.001, (dw, ds)


def test_qcompile_qat_and_its_bad_input(tmp_path, capsys, caplog, monkeypatch):
    from qcompiler import models, qat, qat_cli
    from qcompiler.qat_cli import ptq_codes
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    model = str(EXAMPLES / "tiny_llama.py")
    args = ["--steps", "3", "--batch-tokens", "64", "--seq-len", "32", "-g", "32", "--symmetric", "-q"]
    assert main(["qat", model, "-o", str(tmp_path / "art"), *args]) == 0
    man = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert man["target"]["method"] == "qat" and man["training"]["steps"] == 3
    assert man["training"]["tokens"] == 3 * 64 and man["training"]["data"]["source"] == "calibration_data()"
    assert man["training"]["calib_samples"] is None  # RTN calibrates on nothing
    capsys.readouterr()
    for bad, words in ((["--target", "fp8"], "trains w4a16, w8a16 or w8a8"), (["--steps", "0"], "--steps must be"),
                       (["--scale-lr", "0"], "--scale-lr must be > 0"),
                       (["--calib-samples", "8"], "applies to --init imatrix or gptq"),
                       (["--init", "gptq", "--calib-samples", "0"], "--calib-samples takes a number >= 1"),
                       (["--target", "w8a8", "--init", "gptq"], "--init applies")):
        assert main(["qat", model, "-o", str(tmp_path / "bad"), *args, *bad]) == 1
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    plain = str(EXAMPLES.parent / "tests" / "fixtures" / "plain_lm.py")
    assert main(["qat", plain, "-o", str(tmp_path / "bad"), *args]) == 1
    assert "no training data" in capsys.readouterr().err
    assert main(["qat", plain, "-o", str(tmp_path / "bad"), *args, "--generate", "-1"]) == 1
    assert "--generate takes a number" in capsys.readouterr().err
    # text the model writes itself stands in for none (GPTQ calibrates on --calib-samples of it); the norms
    # train too, kept float
    calibrated = []
    with monkeypatch.context() as m:
        m.setattr(qat_cli, "ptq_codes", lambda *a: calibrated.append(a) or ptq_codes(*a))
        assert main(["qat", plain, "-o", str(tmp_path / "gen"), *args, "--generate", "4", "--train-norms",
                     "--init", "gptq", "--calib-samples", "3"]) == 0
    (_, _, method, cfg, samples), = calibrated
    assert method == "gptq" and cfg.samples_for(method) == 3 and len(samples) == 3
    man = json.loads((tmp_path / "gen" / "manifest.json").read_text())["training"]
    assert man["calib_samples"] == 3 and man["init_seconds"] > 0
    assert man["data"]["source"] == "4 sequences of 32 tokens sampled from the float model" and man["train_norms"]
    assert man["learn"] == "scales"  # the default
    assert man["tokens"] == 3 * 64 and not man["samples_cached"]
    # the same model and sampling options again: the sequences come from the cache, not the model
    with monkeypatch.context() as m:
        m.setattr(qat, "sample_sequences", lambda *a, **k: pytest.fail("sampled again"))
        assert main(["qat", plain, "-o", str(tmp_path / "gen1"), *args, "--generate", "4", "--learn", "all",
                     "--scale-lr", "5e-4"]) == 0
    again = json.loads((tmp_path / "gen1" / "manifest.json").read_text())["training"]
    assert again["samples_cached"] and again["data"]["sha256"] == man["data"]["sha256"]
    assert again["learn"] == "all" and again["scale_lr"] == 5e-4
    with caplog.at_level(logging.WARNING, logger="qcompiler.qat_cli"):  # 6 sequences' worth from 2
        assert main(["qat", plain, "-o", str(tmp_path / "gen2"), *args, "--generate", "2"]) == 0
    assert "trained on 3.0 times" in caplog.text and "--generate 3 or more" in caplog.text


def test_init_takes_the_methods_own_defaults():
    """``--init gptq`` starts from the GPTQ the compile would run (act-order, clipped ranges), not
    from a GPTQ with the options of the RTN target QAT was asked for."""
    from qcompiler.qat_cli import ptq_target
    t = ptq_target(W4A16(group_size=64, symmetric=True, method="rtn"), "gptq")
    assert t.method == "gptq" and t.act_order is True and t.clip is True
    assert ptq_target(W4A16(method="rtn"), "imatrix").clip is False

