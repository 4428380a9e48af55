"""Passes on random small Llama-like models: exact passes equal the input program, quantize
passes equal an independent plain-PyTorch fake-quant reference and stay above an SQNR bound."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qcompiler.capture import capture
from qcompiler.codegen.fx import call_nodes, get_constant
from qcompiler.codegen.quant import sqnr_db
from qcompiler.passes import fuse_weight_only, linear_nodes, normalize, quantize_weights
from reference import fake_quant_model
from tiny_models import Args, build

aten, qc = torch.ops.aten, torch.ops.qc


@st.composite
def small_models(draw):
    n_kv = draw(st.sampled_from([1, 2]))
    n_heads = n_kv * draw(st.sampled_from([1, 2, 3]))
    head_dim = 32  # every linear input (dim, hidden) a multiple of the largest group drawn
    a = Args(vocab=draw(st.integers(32, 96)), dim=n_heads * head_dim, n_layers=draw(st.integers(1, 2)),
             n_heads=n_heads, n_kv_heads=n_kv, hidden=draw(st.sampled_from([64, 96, 128])),
             bias=draw(st.booleans()), tie=draw(st.booleans()))
    return a, build(a, seed=draw(st.integers(0, 1000)))


def _inputs(vocab: int, T: int, seed: int, start: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (T,), generator=g), torch.arange(start, start + T)


def _eager(model, ids, pos):
    with torch.no_grad():
        return model(input_ids=ids[None], position_ids=pos[None])[0]


@given(small_models(), st.integers(1, 20), st.integers(0, 100), st.integers(0, 2**16))
def test_capture_and_normalize_equal_eager(m, T, start, seed):
    a, model = m
    gm = normalize(capture(model, max_tokens=256))
    assert {aten.linear.default, aten.scaled_dot_product_attention.default} <= {n.target for n in gm.graph.nodes}
    assert len(linear_nodes(gm)) == 7 * a.n_layers + 1
    ids, pos = _inputs(a.vocab, T, seed, start)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, pos), _eager(model, ids, pos), rtol=1e-5, atol=1e-5)


SQNR_DB = {4: 8.0, 8: 30.0}  # logits vs float, random models (measured: int4 >= ~12 dB, int8 >= ~38 dB)


@given(small_models(), st.sampled_from([(4, 16), (4, 32), (8, None), (8, 32)]), st.booleans(),
       st.integers(1, 20), st.integers(0, 2**16))
def test_quantize_equals_reference_and_fuse_is_exact(m, scheme, symmetric, T, seed):
    a, model = m
    bits, group = scheme
    gm = normalize(capture(model, max_tokens=256))
    ids, pos = _inputs(a.vocab, T, seed)
    gm = quantize_weights(gm, bits=bits, group_size=group, symmetric=symmetric)
    quantized = [k for k, v in gm.meta["qc_layers"].items() if v["status"] == "quantized"]
    n_dq = len(call_nodes(gm, qc.dequantize_weight.default))
    assert len(quantized) == 7 * a.n_layers and n_dq == len(quantized)
    assert gm.meta["qc_layers"]["out"]["status"] == "float"  # lm_head kept float
    with torch.no_grad():
        y_q = gm(ids, pos)
        ref = _eager(fake_quant_model(model, bits, group, symmetric, skip=("out",)), ids, pos)
        torch.testing.assert_close(y_q, ref, rtol=1e-4, atol=1e-4)
        assert sqnr_db(_eager(model, ids, pos), y_q) > SQNR_DB[bits]
        fused = fuse_weight_only(gm)
        fused_op = qc.w4a16_linear.default if bits == 4 else qc.w8a16_linear.default
        assert len(call_nodes(fused, fused_op)) == len(quantized)
        assert not call_nodes(fused, qc.dequantize_weight.default)
        torch.testing.assert_close(fused(ids, pos), y_q, rtol=1e-5, atol=1e-5)
    # the float weights left the program: only int codes, scales and zero points remain
    assert not any(n.endswith("wq.weight") for n, _ in fused.named_parameters())


def test_indivisible_layers_stay_float_and_are_recorded():
    a = Args(vocab=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, hidden=96)
    gm = quantize_weights(normalize(capture(build(a), max_tokens=64)), bits=4, group_size=64, symmetric=True)
    layers = gm.meta["qc_layers"]
    assert layers["layers.0.w2"] == {"status": "float", "reason": "input size 96 not divisible by group size 64",
                                     "shape": [64, 96]}
    assert layers["layers.0.w1"]["status"] == "quantized" and layers["layers.0.w1"]["group_size"] == 64
    assert len(call_nodes(gm, qc.dequantize_weight.default)) == 6


@pytest.mark.parametrize("tie", [False, True])
def test_lm_head_quantized_on_request(tie):
    a = Args(vocab=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, hidden=64, tie=tie)
    model = build(a)
    gm = quantize_weights(normalize(capture(model, max_tokens=64)), bits=8, group_size=None,
                          symmetric=True, include_lm_head=True)
    assert gm.meta["qc_layers"]["out"]["status"] == "quantized"
    ids, pos = _inputs(64, 9, 0)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, pos), _eager(fake_quant_model(model, 8, None, True), ids, pos),
                                   rtol=1e-4, atol=1e-4)
    # the embedding still reads the float table, tied or not
    (emb,) = call_nodes(gm, aten.embedding.default)
    assert emb.args[0].op == "get_attr" and get_constant(gm, emb.args[0].target).dtype == torch.float32
