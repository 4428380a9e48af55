"""Triton kernels of the activation-quantizing ops (codegen.triton_scaled_mm) against their references
(codegen.act_quant): int8 and fp8 codes and W8A8 outputs bit for bit, FP8 outputs to how their sums round
(``FP8_ROW_REL``). They run on the GPU when there is one, else in the Triton interpreter (no bf16 there: it computes
bf16 wrongly), always on small odd shapes: K not a multiple of any tile, partial M and N tiles.

NOTE: references are always evaluated on CPU. On CUDA, torch divides by a Python number by multiplying
with its reciprocal, so the references' ``absmax / 127`` can differ in the last bit there; the kernels
divide (``div_rn``), as the references do on CPU."""
import math

import pytest
import torch

from qcompiler.codegen import act_quant
from qcompiler.codegen import triton_scaled_mm as tsm
from qcompiler.codegen.act_quant import quantize_weight_fp8
from qcompiler.codegen.quant import quantize_weight

qc = torch.ops.qc
FP8 = torch.float8_e4m3fn
SHAPES_MKN = [(1, 40, 24), (3, 72, 40), (17, 40, 24), (17, 72, 40)]  # (M, K, N)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rows_of_many_ranges(M, K, seed=0):
    """Rows spanning six decades, and (M > 1) a zero last row: its scale is ``tiny``, its codes 0."""
    x = _x(M, K, seed=seed) * torch.logspace(-3, 3, M).reshape(M, 1)
    if M > 1:
        x[-1] = 0
    return x


def _int8_weight(N, K, seed=1):
    qw = quantize_weight(_x(N, K, seed=seed), 8, None, symmetric=True)
    return qw.qweight, qw.scales.float()


def _to(device, *ts):
    return [None if t is None else t.to(device) for t in ts]


def _fp8_codes_ref(x):
    """The activation half of ``fp8_linear_ref``, spelled out."""
    s = act_quant.absmax_scale(x, act_quant.FP8_MAX)
    return (x.float() / s).clamp(-448, 448).to(FP8), s


def _assert_fp8_close(y, ref, row_rel):
    """fp8 outputs have the reference's codes and exact products; only the sums round differently, by
    up to ``row_rel`` of the row's largest |output|. Then each output rounds to its dtype: one unit in
    the last place (rtol)."""
    ref = ref.float()
    err = (y.cpu().float() - ref).abs()
    rtol = {torch.float32: 1e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[y.dtype]
    bound = row_rel * ref.abs().amax(-1, keepdim=True) + rtol * ref.abs()
    assert (err <= bound).all(), f"max error / bound {(err / bound).max().item():.2f}"


# NOTE: on CUDA, fp8 tensor cores sum into their own accumulator, narrower than fp32, which the kernel
# adds into an fp32 one once per 128-long K tile: measured up to 1.7e-4 of a row's largest output at
# K = 4096 (H200). Elsewhere only the fp32 summation order differs.
FP8_ROW_REL = {"cuda": 5e-4, "cpu": 1e-5}


# --- quantization ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 40), (3, 72), (17, 40), (2, 3, 72), (2, 8300)])  # 8300: read in two blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_per_token_equals_ref(shape, dtype, kernel_device):
    x = _rows_of_many_ranges(math.prod(shape[:-1]), shape[-1]).reshape(shape).to(dtype)
    q, s = tsm.quantize_per_token_triton(x.to(kernel_device))
    assert q.dtype == torch.int8 and q.shape == shape and s.dtype == torch.float32 and s.shape == (*shape[:-1], 1)
    q_ref, s_ref = act_quant.quantize_per_token_ref(x)
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu(), q_ref)


def test_quantize_per_token_rounds_half_to_even(kernel_device):
    below_half = 0.49999997  # the float32 just below 0.5: ``floor(v + 0.5)`` would round it up
    ties = [0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 125.5, -126.5, 126.5, below_half, -below_half, 2.5000002]
    row0 = torch.tensor([127.0, *ties] + [0.25] * 26)  # absmax 127: scale exactly 1, codes = round(x)
    row1 = torch.tensor([-254.0, 1.0, 3.0, 5.0, -7.0] + [0.0] * 35)  # scale exactly 2: ties again
    x = torch.stack([row0, row1])  # [2, 40]
    q, s = tsm.quantize_per_token_triton(x.to(kernel_device))
    assert s.cpu().flatten().tolist() == [1.0, 2.0]
    assert q.cpu()[0, :14].tolist() == [127, 0, 2, 2, 4, 0, -2, -2, 126, -126, 126, 0, 0, 3]
    assert q.cpu()[1, :5].tolist() == [-127, 0, 2, 2, -4]
    assert torch.equal(q.cpu(), act_quant.quantize_per_token_ref(x)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_fp8_equals_ref(dtype, kernel_device):
    x = _rows_of_many_ranges(17, 72, seed=3).to(dtype)
    q, s = tsm.quantize_per_token_fp8_triton(x.to(kernel_device))
    q_ref, s_ref = _fp8_codes_ref(x)
    assert q.dtype == FP8 and q.shape == x.shape and torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))  # the bits: -0 stays -0


def test_quantize_fp8_rounds_half_to_even(kernel_device):
    """Scale 1 (absmax 448): ties between e4m3 neighbours, normal and subnormal, and values under the
    smallest subnormal (2^-9) that become ±0."""
    sub = 2.0 ** -9
    vals = [448.0, 1.0625, 1.1875, -1.0625, 248.0, 432.0, -432.0, 0.5 * sub, 1.5 * sub, 2.0 ** -6 + 0.5 * sub,
            -0.5 * sub, -0.25 * sub, 0.0]
    want = [448.0, 1.0, 1.25, -1.0, 256.0, 448.0, -448.0, 0.0, 2 * sub, 2.0 ** -6, -0.0, -0.0, 0.0]
    x = torch.tensor(vals + [0.25] * 27)  # [40]
    q, s = tsm.quantize_per_token_fp8_triton(x.to(kernel_device))
    got = q.cpu().float()[:13]
    assert s.item() == 1.0
    assert got.tolist() == want and torch.equal(got.signbit(), torch.tensor(want).signbit())
    assert torch.equal(q.cpu().view(torch.uint8), _fp8_codes_ref(x)[0].view(torch.uint8))


# --- the GEMM ------------------------------------------------------------------------------

@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
@pytest.mark.parametrize("per_row", [False, True])
def test_scaled_mm_many_tiles(qdtype, per_row, kernel_device):
    """A small config: 4 M tiles in groups of 2, 3 N tiles, 5 K tiles (the last partial)."""
    M, N, K = 50, 40, 300
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(-127, 128, (M, K), generator=g), torch.randint(-127, 128, (N, K), generator=g)
    if qdtype == FP8:
        a, b = (a.float() / 8).to(FP8), (b.float() / 8).to(FP8)
    else:
        a, b = a.to(torch.int8), b.to(torch.int8)
    sa = _x(M, 1, seed=5).abs() if per_row else torch.tensor([0.5])
    sb, bias = _x(N, 1, seed=6).abs(), _x(N, seed=7)
    cfg = tsm.GemmConfig(block_m=16, block_n=16, block_k=64, group_m=2, num_warps=4, num_stages=2)
    y = tsm.scaled_mm_triton(*_to(kernel_device, a, b, sa, sb, bias), torch.float32, config=cfg)
    acc = a.double() @ b.double().T  # exact for both: 8-bit products, K * 2^14 < 2^53
    y_ref = (acc.float() * sa * sb.T + bias) if qdtype == torch.int8 else (acc * sa.double() * sb.T.double() + bias)
    if qdtype == torch.int8:
        assert torch.equal(y.cpu(), y_ref)  # int32 accumulation: exact, and the same fp32 epilogue
    else:
        torch.testing.assert_close(y.cpu(), y_ref.float(), rtol=1e-5, atol=1e-4)  # fp32 summation order


@pytest.mark.parametrize("M,K,N", SHAPES_MKN)
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_w8a8_equals_ref(M, K, N, static, with_bias, dtype, kernel_device):
    """Tolerance: none. The integer product is exact and the fp32 epilogue rounds as the reference's."""
    x = _rows_of_many_ranges(M, K).to(dtype)
    qw, sw = _int8_weight(N, K)
    bias = _x(N, seed=2).to(dtype) if with_bias else None
    input_scale = (x.float().abs().amax() / 127 * 0.8).reshape(1) if static else None  # 0.8: some codes clip
    y = tsm.w8a8_linear_triton(*_to(kernel_device, x, qw, sw, bias, input_scale))
    assert y.shape == (M, N) and y.dtype == dtype
    assert torch.equal(y.cpu(), act_quant.w8a8_linear_ref(x, qw, sw, bias, input_scale))


@pytest.mark.parametrize("static", [False, True])
def test_w8a8_long_rows(static, kernel_device):
    """Rows longer than one quantization block: read twice (absmax, then codes); many K tiles."""
    x = _rows_of_many_ranges(2, 8300)
    qw, sw = _int8_weight(24, 8300)
    input_scale = (x.abs().amax() / 127 * 0.8).reshape(()) if static else None
    y = tsm.w8a8_linear_triton(*_to(kernel_device, x, qw, sw, None, input_scale))
    assert torch.equal(y.cpu(), act_quant.w8a8_linear_ref(x, qw, sw, None, input_scale))


def test_w8a8_strided_batched_input(kernel_device):
    x = _x(2, 3, 2 * 72)[..., ::2]  # [2, 3, 72], K stride 2
    qw, sw = _int8_weight(40, 72)
    y = tsm.w8a8_linear_triton(*_to(kernel_device, x, qw, sw), None, None)
    assert y.shape == (2, 3, 40) and torch.equal(y.cpu(), act_quant.w8a8_linear_ref(x, qw, sw, None, None))


@pytest.mark.parametrize("M,K,N", SHAPES_MKN)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_linear_close_to_ref(M, K, N, with_bias, dtype, kernel_device):
    """Tolerance: ``FP8_ROW_REL`` of each row's largest output, and one unit in the output's last place."""
    x = _rows_of_many_ranges(M, K, seed=8).to(dtype)
    qw, sw = quantize_weight_fp8(_x(N, K, seed=1))
    bias = _x(N, seed=2).to(dtype) if with_bias else None
    y = tsm.fp8_linear_triton(*_to(kernel_device, x, qw, sw, bias))
    assert y.shape == (M, N) and y.dtype == dtype
    _assert_fp8_close(y, act_quant.fp8_linear_ref(x, qw, sw, bias), FP8_ROW_REL[kernel_device])


def test_fp8_linear_fast_accum(kernel_device):
    """Prefill-sized M. On CUDA the sums stay in the tensor cores' accumulator (measured up to 4e-3 of a
    row's largest output at K = 4096); the interpreter has no such accumulator."""
    x = _rows_of_many_ranges(130, 72, seed=8)
    qw, sw = quantize_weight_fp8(_x(40, 72, seed=1))
    y = tsm.fp8_linear_triton(*_to(kernel_device, x, qw, sw), None, fast_accum=True)
    _assert_fp8_close(y, act_quant.fp8_linear_ref(x, qw, sw, None), 1e-2 if kernel_device == "cuda" else 1e-5)


# --- wrapper checks and registration ------------------------------------------------------------

def test_bad_inputs_raise():
    x, (qw, sw) = _x(3, 40), _int8_weight(24, 40)
    with pytest.raises(ValueError, match="qweight must be torch.int8"):
        tsm.w8a8_linear_triton(x, qw[:, :32], sw, None, None)
    with pytest.raises(ValueError, match="qweight must be torch.float8_e4m3fn"):
        tsm.fp8_linear_triton(x, qw, sw, None)
    with pytest.raises(ValueError, match="bias must be"):
        tsm.w8a8_linear_triton(x, qw, sw, torch.zeros(23), None)
    with pytest.raises(ValueError, match="input_scale must be a scalar"):
        tsm.w8a8_linear_triton(x, qw, sw, None, torch.ones(3))
    with pytest.raises(ValueError, match="x must be float32"):
        tsm.quantize_per_token_triton(x.to(torch.int32))
    with pytest.raises(ValueError, match="K contiguous"):
        tsm.scaled_mm_triton(qw, qw.T.contiguous().T, torch.ones(24, 1), sw, None, torch.float32)


def test_registered_as_cuda_kernels():
    for name in ("quantize_per_token", "w8a8_linear", "fp8_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"qc::{name}", "CUDA"), name


# --- GPU only ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64, 300])  # the three tile configs, several M and N tiles
def test_w8a8_bf16_and_long_k_on_cuda(M):
    """bf16 activations; K = 4096 (int32 sums past fp32's exact range)."""
    K, N = 4096, 520
    x = _rows_of_many_ranges(M, K).bfloat16()
    qw, sw = _int8_weight(N, K)
    bias = _x(N, seed=2).bfloat16()
    for input_scale in (None, (x.float().abs().amax() / 127 * 0.8).reshape(1)):
        y = qc.w8a8_linear(*_to("cuda", x, qw, sw, bias, input_scale))  # dispatches to the Triton kernel
        assert torch.equal(y.cpu(), act_quant.w8a8_linear_ref(x, qw, sw, bias, input_scale))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 64, 300])
def test_fp8_bf16_on_cuda(M):
    K, N = 4096, 520
    x = _rows_of_many_ranges(M, K, seed=8).bfloat16()
    qw, sw = quantize_weight_fp8(_x(N, K, seed=1))
    bias = _x(N, seed=2).bfloat16()
    q, s = tsm.quantize_per_token_fp8_triton(x.cuda())
    assert torch.equal(q.cpu().view(torch.uint8), _fp8_codes_ref(x)[0].view(torch.uint8))
    ref = act_quant.fp8_linear_ref(x, qw, sw, bias)
    _assert_fp8_close(qc.fp8_linear(*_to("cuda", x, qw, sw, bias)), ref, FP8_ROW_REL["cuda"])
    _assert_fp8_close(tsm.fp8_linear_triton(*_to("cuda", x, qw, sw, bias), fast_accum=True), ref, 1e-2)


@pytest.mark.gpu
def test_opcheck_on_cuda():
    x = _x(2, 3, 64).cuda()
    qw, sw = _to("cuda", *_int8_weight(32, 64))
    fw, fs = _to("cuda", *quantize_weight_fp8(_x(32, 64, seed=1)))
    bias = _x(32, seed=2).cuda()
    torch.library.opcheck(qc.quantize_per_token, (x,))
    torch.library.opcheck(qc.quantize_per_token, (x.bfloat16(),))
    torch.library.opcheck(qc.w8a8_linear, (x, qw, sw, bias, None))
    torch.library.opcheck(qc.w8a8_linear, (x.bfloat16(), qw, sw, None, torch.tensor([0.03], device="cuda")))
    # NOTE: opcheck's test_schema compares arguments with torch.allclose, which has no float8 kernel
    fp8_checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(qc.fp8_linear, (x, fw, fs, bias), test_utils=fp8_checks)
    torch.library.opcheck(qc.fp8_linear, (x.bfloat16(), fw, fs, None), test_utils=fp8_checks)
