"""Load-time lowerings. CPU: every weight-only linear reaches a packed kernel, siblings that read
one input share one call, and outputs stay within bf16 rounding of the canonical program."""
import math

import pytest
import torch

from qcompiler.capture import capture, export_paged
from qcompiler.codegen import cpu_native, ops
from qcompiler.codegen.cpu import lower_for_cpu
from qcompiler.codegen.cuda import lower_for_cuda
from qcompiler.codegen.fx import call_nodes, get_constant
from qcompiler.codegen.quant import sqnr_db
from qcompiler.loader import prepare
from qcompiler.lowering import lower
from qcompiler.pipeline import run_pipeline
from qcompiler.runtime.step_inputs import single_sequence
from qcompiler.targets import W4A16, W8A16
from tiny_models import Args, build

qc = torch.ops.qc


@pytest.mark.parametrize("target,fast_op", [(W4A16(group_size=32, symmetric=False), qc.wq_linear_native.default),
                                            (W8A16(), qc.wq_linear_native.default),
                                            (W4A16(group_size=32, symmetric=False), qc.w4a16_linear_cpu.default),
                                            (W8A16(), qc.w8a16_linear_cpu.default)],
                         ids=["w4a16-native", "w8a16-native", "w4a16-int4pack", "w8a16-int8pack"])
def test_merge_siblings_and_match_canonical(target, fast_op, monkeypatch):
    if fast_op == qc.wq_linear_native.default and not cpu_native.available():
        pytest.skip("our CPU kernel needs AVX-512 (F, BW) and g++")
    if fast_op != qc.wq_linear_native.default:  # the fallback where our kernel is unavailable
        monkeypatch.setattr(cpu_native, "available", lambda: False)
    a = Args(vocab=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=128, bias=True)
    gm = run_pipeline(capture(build(a), max_tokens=128), target).gm
    T_dense = ops.PACKED_MAX_ROWS + 1
    ids, pos = torch.randint(0, 64, (T_dense,)), torch.arange(T_dense)
    with torch.no_grad():
        lowered = {m: lower_for_cpu(run_pipeline(capture(build(a), max_tokens=128), target).gm, merge=m)
                   for m in (False, True)}
        # wq+wk+wv (biased) one call, w1+w3 one call, wo and w2 alone: 4 per layer instead of 7
        assert len(call_nodes(lowered[True], fast_op)) == 4 * a.n_layers
        assert len(call_nodes(lowered[False], fast_op)) == 7 * a.n_layers
        paged = lowered[True].meta["qc_paged"]
        args = lambda T: single_sequence(ids[:T], pos[:T], paged, torch.float32)  # noqa: E731
        ref = gm(*args(T_dense))
        for T in (1, T_dense):  # the packed GEMV path and the dense bf16 path
            outs = [lowered[m](*args(T)) for m in (False, True)]
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-3, atol=1e-3 * ref.abs().max().item())
            assert (outs[1] - ref[:T]).abs().max() < 2e-2 * ref.abs().max()


@pytest.mark.parametrize("target", [W4A16(group_size=32, symmetric=False), W8A16()])
def test_cuda_lowering_merges_siblings_and_keeps_outputs(target):
    """``lower_for_cuda`` is graph surgery only (the kernels it leads to are the canonical ops'),
    so it is checked here on the CPU: siblings merged, scales and zero points N-contiguous, and
    outputs equal to the canonical program's."""
    a = Args(vocab=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=128, bias=True)
    op = qc.w4a16_linear.default if target.bits == 4 else qc.w8a16_linear.default
    gm = run_pipeline(capture(build(a), max_tokens=128), target).gm
    lowered = lower_for_cuda(run_pipeline(capture(build(a), max_tokens=128), target).gm)
    nodes = call_nodes(lowered, op)
    assert len(nodes) == 4 * a.n_layers
    for n in nodes:
        scales = get_constant(lowered, n.args[2].target)
        assert scales.shape[1] == 1 or scales.stride() == (1, scales.shape[0])
    ids, pos = torch.randint(0, 64, (9,)), torch.arange(9)
    args = single_sequence(ids, pos, gm.meta["qc_paged"], torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(lowered(*args), gm(*args), rtol=1e-5, atol=1e-5)


def test_cuda_program_traces_whole_for_inductor():
    """What ``torch.compile`` sees on a GPU, traced here on the CPU (the ``qc`` ops run their
    reference code): the CUDA lowering of a W4A16 program with a float lm_head in bf16 compiles as
    one graph with dynamic token counts, and computes what the eager lowering computes."""
    a = Args(vocab=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=128)
    target = W4A16(group_size=32, symmetric=False)
    gm = run_pipeline(capture(build(a), max_tokens=128), target).gm
    eager = lower(gm, target.name, "cuda", "eager").gm
    assert call_nodes(eager, qc.w4a16_linear.default) and call_nodes(eager, ops.linear_bf16)
    compiled = torch.compile(eager, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for T in (1, 9):
            ids, pos = torch.randint(0, 64, (T,)), torch.arange(T)
            args = single_sequence(ids, pos, gm.meta["qc_paged"], torch.bfloat16)
            ref = eager(*args)
            torch.testing.assert_close(compiled(*args), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("native", [True, False], ids=["native", "int8pack"])
def test_int8_lm_head_reaches_a_packed_kernel(native, monkeypatch):
    """``lm_head_bits=8``: the output projection alone in int8 per channel (its own pass, first),
    served by our kernel (or torch's int8pack where ours is unavailable); the rest as the scheme
    says; logits near the float-head program's."""
    if native and not cpu_native.available():
        pytest.skip("our CPU kernel needs AVX-512 (F, BW) and g++")
    if not native:
        monkeypatch.setattr(cpu_native, "available", lambda: False)
    a = Args(vocab=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=128, tie=True)
    res = {bits: run_pipeline(capture(build(a), max_tokens=128), W4A16(group_size=32, lm_head_bits=bits))
           for bits in (None, 8)}
    assert [r["name"] for r in res[8].records][:2] == ["normalize", "quantize_lm_head"]
    heads = [v for v in res[8].layers.values() if v.get("bits") == 8]
    assert len(heads) == 1 and heads[0]["group_size"] == 64 and heads[0]["symmetric"]
    assert sum(v.get("bits") == 4 for v in res[8].layers.values()) == 7 * a.n_layers
    lowered = lower_for_cpu(res[8].gm)
    if native:
        heads = [n for n in call_nodes(lowered, qc.wq_linear_native.default) if n.args[-1] == 8]
    else:
        heads = call_nodes(lowered, qc.w8a16_linear_cpu.default)
    assert len(heads) == 1
    ids, pos = torch.randint(0, 64, (9,)), torch.arange(9)
    args = single_sequence(ids, pos, res[None].gm.meta["qc_paged"], torch.float32)
    with torch.no_grad():
        assert sqnr_db(res[None].gm(*args), lowered(*args)) > 30


def test_lm_head_bits_is_validated():
    with pytest.raises(ValueError, match="lm_head_bits"):
        W4A16(lm_head_bits=4)
    with pytest.raises(ValueError, match="choose one"):
        W4A16(lm_head_bits=8, quantize_lm_head=True)


def test_compiled_program_equals_eager_with_packed_kernels():
    """``load(compile="jit")`` on CPU: packed-kernel linears, the KV write and decode attention traced into
    the Inductor graph compute what the eager program computes, for a decode-shaped call (one
    token: the traced attention) and a prompt (the opaque attention op)."""
    a = Args(vocab=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=128, tie=True)
    target = W4A16(group_size=32, symmetric=False, lm_head_bits=8)
    gm = run_pipeline(capture(build(a), max_tokens=128), target).gm
    paged = gm.meta["qc_paged"]
    ep = export_paged(gm, 128, paged, torch.float32)
    manifest = {"target": target.to_dict(), "model": {"dtype": "float32"}, "program": {"max_tokens": 128, "paged": paged}}
    eager, compiled = (prepare(ep, manifest, compile=c) for c in ("eager", "jit"))
    ids, pos = torch.randint(0, 64, (9,)), torch.arange(9)
    for T in (1, 9):
        torch.testing.assert_close(compiled.flat(ids[:T], pos[:T]), eager.flat(ids[:T], pos[:T]), rtol=1e-2, atol=1e-2)


def test_auto_lm_head_is_int8_only_where_cheap(monkeypatch):
    """``lm_head_bits="auto"`` (w4a16's default): the head's int8 cost is measured on the calibration
    samples (the source model's own next-token cross entropy, float head against int8 head, gives
    the same figure); within the limit the program is the ``lm_head_bits=8`` one, over it the head
    stays float with the reason recorded, and without data it stays float."""
    from qcompiler import pipeline
    from qcompiler.codegen.quant import dequantize_weight_ref, quantize_weight
    a = Args(vocab=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=128)
    model = build(a)
    g = torch.Generator().manual_seed(3)
    samples = [torch.randint(0, 64, (40,), generator=g) for _ in range(3)]

    def run(bits, samples=samples):
        return run_pipeline(capture(build(a), max_tokens=128), W4A16(group_size=32, lm_head_bits=bits), samples=samples)

    def ce(m):
        with torch.no_grad():
            return sum(torch.nn.functional.cross_entropy(m(s[None], torch.arange(len(s))[None])[0, :-1], s[1:],
                                                         reduction="sum") for s in samples).item()

    ce_float = ce(model)
    qw = quantize_weight(model.out.weight.detach(), 8, None, True)
    model.out.weight.data = dequantize_weight_ref(qw.qweight, qw.scales, qw.zeros, 8)
    expected = math.exp((ce(model) - ce_float) / sum(len(s) - 1 for s in samples)) - 1

    auto, eight = run("auto"), run(8)
    head = auto.layers["out"]
    assert head["status"] == "quantized" and head["bits"] == 8
    assert head["perplexity_increase"] == pytest.approx(expected, abs=1e-5) and head["perplexity_increase"] < 0.005
    args = single_sequence(samples[0], torch.arange(40), auto.gm.meta["qc_paged"], torch.float32)
    with torch.no_grad():
        assert torch.equal(auto.gm(*args), eight.gm(*args))
    monkeypatch.setattr(pipeline, "LM_HEAD_MAX_INCREASE", expected - 1e-4)
    over = run("auto").layers["out"]
    assert over["status"] == "float" and "would cost" in over["reason"] and over["perplexity_increase"] == head["perplexity_increase"]
    none = run("auto", samples=None).layers["out"]  # without data: RTN ranges, nothing to measure with
    assert none["status"] == "float" and "perplexity_increase" not in none
