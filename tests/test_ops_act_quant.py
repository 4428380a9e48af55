"""Activation-quantizing qc:: ops: integer codes checked by hand; W8A8 equals an int64 computation
exactly, FP8 its float32 one to rounding; both stay within an SQNR bound of the float linear;
schemas and fake kernels pass opcheck."""
import pytest
import torch
import torch.nn.functional as F

from qcompiler.codegen import act_quant
from qcompiler.codegen.act_quant import quantize_weight_fp8
from qcompiler.codegen.quant import quantize_weight, sqnr_db

qc = torch.ops.qc
TINY = torch.finfo(torch.float32).tiny


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _int8_weight(w):
    """Per-channel int8 weights as ``quantize_w8a8`` makes them (absmax / 127.5, codes in [-128, 127])."""
    qw = quantize_weight(w, 8, None, symmetric=True)
    return qw.qweight, qw.scales.float()


def test_quantize_per_token_by_hand():
    x = torch.tensor([[254.0, -254.0, 3.0, 5.0, -1.0],  # scale 2: ±254 -> ±127; 1.5 -> 2, 2.5 -> 2, -0.5 -> 0
                      [0.0, 0.0, 0.0, 0.0, 0.0],  # a zero row: codes 0, no NaN
                      [-1.27, 0.5, 0.014, 0.0, 0.6]])  # the absmax is negative: -127
    q, s = qc.quantize_per_token(x.reshape(3, 1, 5))
    assert q.dtype == torch.int8 and q.shape == (3, 1, 5)
    assert s.dtype == torch.float32 and s.shape == (3, 1, 1)
    assert q.reshape(3, 5).tolist() == [[127, -127, 2, 2, 0], [0, 0, 0, 0, 0], [-127, 50, 1, 0, 60]]
    assert s.flatten().tolist() == [2.0, TINY, pytest.approx(0.01)]


def test_quantize_per_token_invariants():
    x = _x(4, 7, 96) * torch.logspace(-3, 3, 7).reshape(1, 7, 1)  # rows of very different ranges
    q, s = qc.quantize_per_token(x.bfloat16())
    assert (q.abs().amax(-1) == 127).all()  # every row uses its full range
    assert ((q.float() * s - x.bfloat16().float()).abs() <= s / 2 * (1 + 1e-5)).all()  # round to nearest


def test_fp8_weight_quantizer_by_hand():
    q, s = quantize_weight_fp8(torch.tensor([[896.0, 2.0, -3.0, 0.2], [0.0, 0.0, 0.0, 0.0]]))
    assert q.dtype == torch.float8_e4m3fn and s.flatten().tolist() == [2.0, TINY]
    assert q.float().tolist() == [[448.0, 1.0, -1.5, 0.1015625], [0.0, 0.0, 0.0, 0.0]]  # 0.1 -> 1.625 * 2^-4


def _w8a8_int64(x, qweight, weight_scale, bias, input_scale):
    """The scheme spelled out: int64 codes, an int64 product, then the float32 epilogue."""
    xf = x.float()
    sx = xf.abs().amax(-1, keepdim=True) / 127 if input_scale is None else input_scale.float().reshape(())
    qx = torch.round(xf / sx).clamp(-127, 127).long()
    acc = (qx.reshape(-1, x.shape[-1]) @ qweight.long().T).reshape(*x.shape[:-1], -1)
    y = acc.float() * sx * weight_scale.float().reshape(-1)
    return (y if bias is None else y + bias.float()).to(x.dtype)


@pytest.mark.parametrize("K", [24, 1536])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_equals_reference_exactly(K, static, with_bias, dtype):
    x = _x(2, 3, K).to(dtype)
    qw, sw = _int8_weight(_x(40, K, seed=1))
    bias = _x(40, seed=2) if with_bias else None
    input_scale = (x.float().abs().amax() / 127 * 0.8).reshape(1) if static else None  # 0.8: some codes clip
    y = qc.w8a8_linear(x, qw, sw, bias, input_scale)
    assert y.shape == (2, 3, 40) and y.dtype == dtype
    assert torch.equal(y, _w8a8_int64(x, qw, sw, bias, input_scale))
    assert torch.equal(y, act_quant.w8a8_linear_ref(x, qw, sw, bias, input_scale))


def test_w8a8_past_fp32_exact_length():
    """Near-full-scale, mostly same-signed codes: past FP32_EXACT_MAX_K a single fp32 GEMM is wrong."""
    K = 2100  # two full chunks and a partial one
    assert K > 2 * act_quant.FP32_EXACT_MAX_K
    g = torch.Generator().manual_seed(3)
    a = torch.randint(100, 128, (5, K), dtype=torch.int8, generator=g)
    w = torch.randint(-128, -100, (7, K), dtype=torch.int8, generator=g)
    exact = a.long() @ w.long().T
    assert not torch.equal((a.float() @ w.float().T).long(), exact)
    assert torch.equal(act_quant.int8_mm_via_fp32(a, w).long(), exact)
    x = a.float() / 2  # each row's absmax is 63.5, its scale 0.5: its codes are ``a`` again
    y = qc.w8a8_linear(x, w, torch.ones(7, 1), None, None)
    assert torch.equal(y, exact.float() * 0.5)


@pytest.mark.parametrize("static,min_db", [(False, 35.0), (True, 30.0)])
def test_w8a8_close_to_float_linear(static, min_db):
    x, w, bias = _x(16, 256), _x(64, 256, seed=1), _x(64, seed=2)
    input_scale = x.abs().amax() / 127 if static else None
    y = qc.w8a8_linear(x, *_int8_weight(w), bias, input_scale)
    assert sqnr_db(F.linear(x, w, bias), y) > min_db


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear(with_bias, dtype):
    x, w = _x(2, 3, 128).to(dtype), _x(48, 128, seed=1)
    bias = _x(48, seed=2) if with_bias else None
    qw, sw = quantize_weight_fp8(w)
    y = qc.fp8_linear(x, qw, sw, bias)
    assert y.shape == (2, 3, 48) and y.dtype == dtype
    assert torch.equal(y, act_quant.fp8_linear_ref(x, qw, sw, bias))
    sx = x.float().abs().amax(-1, keepdim=True) / 448
    xq = (x.float() / sx).to(torch.float8_e4m3fn).float()  # |x / sx| is 448 up to rounding: no clamp
    by_hand = (xq @ qw.float().T) * sx * sw.T + (0 if bias is None else bias)
    # float32 GEMMs that may sum in different orders, then the cast to ``dtype``
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(y.float(), by_hand, **tol)
    assert sqnr_db(F.linear(x.float(), w, bias), y) > (25.0 if dtype == torch.float32 else 24.0)


def test_opcheck_all_ops():
    x = _x(2, 3, 64)
    qw, sw = _int8_weight(_x(32, 64, seed=1))
    fw, fs = quantize_weight_fp8(_x(32, 64, seed=1))
    bias = _x(32, seed=2)
    torch.library.opcheck(qc.quantize_per_token, (x,))
    torch.library.opcheck(qc.w8a8_linear, (x, qw, sw, bias, None))
    torch.library.opcheck(qc.w8a8_linear, (x, qw, sw, None, torch.tensor(0.03)))
    torch.library.opcheck(qc.w8a8_linear, (x.bfloat16(), qw, sw, None, torch.tensor([0.03])))
    # NOTE: opcheck's test_schema compares every argument before and after the call with
    # torch.allclose, which has no float8 kernel; the other checks take the float8 weight.
    fp8_checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(qc.fp8_linear, (x, fw, fs, bias), test_utils=fp8_checks)
    torch.library.opcheck(qc.fp8_linear, (x.bfloat16(), fw, fs, None), test_utils=fp8_checks)
