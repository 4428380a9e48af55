"""Quantization math against hand-computed cases, and its invariants on random weights."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qcompiler.codegen.quant import (compute_qparams, dequantize_weight_ref, pack_int4, qrange, quantize,
                                     quantize_weight, sqnr_db, unpack_int4)
from qcompiler.passes.quantization import clip_ratios, clip_weight, search_qparams, weighted_qparams
from reference import fake_quant_ref


def test_int4_symmetric_by_hand():
    w = torch.tensor([[-1.5, 0.75, 0.0, 1.5]])
    s, z = compute_qparams(w, 4, 4, symmetric=True)
    assert z is None and s.item() == pytest.approx(0.2)  # absmax / 7.5
    # -7.5 rounds half-to-even to -8; +7.5 -> 8 clips to 7
    assert quantize(w, s, z, 4, 4).tolist() == [[-8, 4, 0, 7]]
    qw = quantize_weight(w, 4, 4, symmetric=True)
    torch.testing.assert_close(dequantize_weight_ref(*qw, bits=4), torch.tensor([[-1.6, 0.8, 0.0, 1.4]]))


def test_int4_asymmetric_positive_range_includes_zero():
    w = torch.tensor([[0.5, 1.0, 2.0, 3.5]])
    s, z = compute_qparams(w, 4, 4, symmetric=False)
    assert s.item() == pytest.approx(3.5 / 15) and z.tolist() == [[-8]]  # range widened to [0, 3.5]
    assert quantize(w, s, z, 4, 4).tolist() == [[-6, -4, 1, 7]]
    deq = dequantize_weight_ref(*quantize_weight(w, 4, 4, symmetric=False), bits=4)
    torch.testing.assert_close(deq, torch.tensor([[2, 4, 9, 15]]) * (3.5 / 15))


def test_int4_asymmetric_zero_point_and_half_to_even():
    w = torch.tensor([[-1.0, -0.5, 0.25, 2.0]])
    s, z = compute_qparams(w, 4, 4, symmetric=False)
    assert s.item() == pytest.approx(0.2) and z.tolist() == [[-3]]
    assert quantize(w, s, z, 4, 4).tolist() == [[-8, -5, -2, 7]]  # -2.5 -> -2, 1.25 -> 1
    deq = dequantize_weight_ref(*quantize_weight(w, 4, 4, symmetric=False), bits=4)
    torch.testing.assert_close(deq, torch.tensor([[-1.0, -0.4, 0.2, 2.0]]))


def test_int8_symmetric_per_channel():
    w = torch.tensor([[2.55, -1.0, 0.0, 0.01], [0.0, 0.0, 0.0, 0.0]])
    qw = quantize_weight(w, 8, None, symmetric=True)
    assert qw.qweight.dtype == torch.int8 and qw.scales.shape == (2, 1)
    assert qw.scales[0].item() == pytest.approx(2.55 / 127.5)
    assert qw.qweight[0].tolist() == [127, -50, 0, 0]  # 127.5 clips to 127
    assert qw.qweight[1].tolist() == [0, 0, 0, 0]      # an all-zero row stays zero, no NaN
    assert torch.isfinite(dequantize_weight_ref(*qw, bits=8)).all()


def test_pack_layout_low_nibble_first():
    q = torch.tensor([[-8, 7, 0, -1]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0xF0, 0x78]]
    assert unpack_int4(packed).tolist() == q.tolist()


@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_pack_roundtrip(n, k2, seed):
    q = torch.randint(-8, 8, (n, 2 * k2), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(unpack_int4(pack_int4(q)), q)


@given(bits=st.sampled_from([4, 8]), group=st.sampled_from([16, 32, None]), symmetric=st.booleans(),
       seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_rtn_matches_reference_and_error_bound(bits, group, symmetric, seed, scale):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed)) * scale
    qw = quantize_weight(w, bits, group, symmetric)
    deq = dequantize_weight_ref(*qw, bits=bits)
    torch.testing.assert_close(deq, fake_quant_ref(w, bits, group, symmetric), rtol=1e-5, atol=1e-6 * scale)
    G = group or 64
    step = qw.scales.float().repeat_interleave(G, dim=1)
    # every weight within half a step, but for the clipped top code of a symmetric grid (one step)
    bound = step * (1.0 if symmetric else 0.5) * (1 + 1e-5)
    assert ((w - deq).abs() <= bound).all()
    assert sqnr_db(w, deq) > (17 if bits == 4 else 40)


def _group_errors(w, scales, zeros, bits, G, h=None):
    """Per group: δ H_gg δᵀ (or ‖δ‖²) of the RTN weight with these qparams, [N, K // G]."""
    N, K = w.shape
    q = quantize(w, scales, zeros, bits, G).float().reshape(N, K // G, G)
    d = ((q - (0 if zeros is None else zeros.float().unsqueeze(-1))) * scales.unsqueeze(-1)).reshape(N, K) - w
    if h is None:
        return d.reshape(N, K // G, G).square().sum(-1)
    return torch.stack([((d[:, g:g + G] @ h[g:g + G, g:g + G]) * d[:, g:g + G]).sum(-1) for g in range(0, K, G)], 1)


@given(st.integers(0, 2**16), st.sampled_from([(4, 16), (4, 32), (8, 64)]), st.booleans(), st.booleans())
def test_clipped_ranges_never_lose_and_win_at_4_bits(seed, bits_group, symmetric, with_hessian):
    """Per group, the searched range's error is at most min-max's (p = 1 is a candidate), by the same
    measure; at 4 bits the total is lower, by far when scored on inputs of uneven channel scales."""
    bits, G = bits_group
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 128, generator=g) * 0.02
    x = torch.randn(256, 128, generator=g) * torch.exp(torch.randn(128, generator=g))
    h = x.t() @ x if with_hessian else None
    s0, z0 = compute_qparams(w, bits, G, symmetric)
    s1, z1 = search_qparams(w, bits, G, symmetric, h)
    e0, e1 = _group_errors(w, s0, z0, bits, G, h), _group_errors(w, s1, z1, bits, G, h)
    assert (e1 <= e0 * (1 + 1e-5) + 1e-12).all()
    if bits == 4:
        assert e1.sum() < (0.85 if with_hessian else 0.99) * e0.sum()


@given(st.integers(0, 2**16), st.booleans())
def test_clip_weight_makes_min_max_pick_the_clipped_range(seed, symmetric):
    """Clamping the weight to the clipped ranges makes RTN's min-max qparams the searched ones, also
    after its rows are rescaled (AWQ folds a later group's scale into a linear's rows)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 64, generator=g) * 0.02
    p = clip_ratios(w, 4, 32, symmetric)
    wc = clip_weight(w, 32, p)
    s, z = search_qparams(w, 4, 32, symmetric)
    sc, zc = compute_qparams(wc, 4, 32, symmetric)
    torch.testing.assert_close(sc, s)
    assert z is None and zc is None or torch.equal(zc, z)
    rows = 2.0 ** torch.randint(-3, 4, (16, 1), generator=g).float()  # exact in float
    s2, z2 = compute_qparams(wc * rows, 4, 32, symmetric)
    torch.testing.assert_close(s2, s * rows)
    assert z is None or torch.equal(z2, z)
    assert torch.equal(quantize(wc * rows, s2, z2, 4, 32), quantize(wc, sc, zc, 4, 32))


@given(st.integers(0, 2**16), st.sampled_from([(4, 32), (4, 64), (8, 64)]), st.booleans())
def test_importance_weighted_ranges_never_lose_and_win_at_4_bits(seed, bits_group, symmetric):
    """Per group, the importance-weighted error ``Σ I (Q(w) − w)²`` of the chosen scale and zero point is
    at most min-max's (a candidate); at 4 bits the total is lower, and the error moves off the channels
    that matter: their share falls."""
    bits, G = bits_group
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 128, generator=g) * 0.02
    imp = torch.exp(2 * torch.randn(128, generator=g))     # mean squared inputs, spread as real ones are
    s0, z0 = compute_qparams(w, bits, G, symmetric)
    s1, z1 = weighted_qparams(w, imp, bits, G, symmetric)
    assert (z1 is None) == symmetric and s1.shape == s0.shape
    if z1 is not None:
        qmin, qmax = qrange(bits)
        assert z1.dtype == torch.int8 and bool(((z1 >= qmin) & (z1 <= qmax)).all())
    h = torch.diag(imp)
    e0, e1 = _group_errors(w, s0, z0, bits, G, h), _group_errors(w, s1, z1, bits, G, h)
    assert (e1 <= e0 * (1 + 1e-5) + 1e-12).all()
    if bits == 4:
        assert e1.sum() < 0.9 * e0.sum()
        top = imp >= imp.quantile(0.9)
        share = lambda s, z: float(_channel_errors(w, s, z, bits, G)[:, top].sum() / _channel_errors(w, s, z, bits, G).sum())  # noqa: E731
        assert share(s1, z1) < share(s0, z0)


def _channel_errors(w, scales, zeros, bits, G):
    return (dequantize_weight_ref(quantize_weight(w, bits, G, zeros is None, (scales, zeros)).qweight, scales,
                                  zeros, bits) - w).square()


def test_importance_weighted_ranges_keep_unseen_channels_and_constant_groups_finite():
    """Channels no calibration token activated (importance 0) and all-zero groups still get finite,
    positive scales and codes that dequantize exactly where the weights are zero."""
    w = torch.randn(8, 64) * 0.02
    w[:, :32] = 0.0
    imp = torch.rand(64)
    imp[32:48] = 0.0
    for symmetric in (True, False):
        s, z = weighted_qparams(w, imp, 4, 32, symmetric)
        assert torch.isfinite(s).all() and (s > 0).all()
        deq = dequantize_weight_ref(quantize_weight(w, 4, 32, symmetric, (s, z)).qweight, s, z, 4)
        assert torch.equal(deq[:, :32], w[:, :32]) and torch.isfinite(deq).all()
