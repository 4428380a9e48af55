"""qc:: ops: canonical ops equal their references exactly; fast CPU paths equal them up to
bf16 activation rounding; fake kernels and schemas pass opcheck."""
import pytest
import torch
import torch.nn.functional as F

from qcompiler.codegen import cpu_native, ops
from qcompiler.codegen.cpu import pack_int4_for_cpu
from qcompiler.codegen.quant import dequantize_weight_ref, quantize_weight
from reference import fake_quant_ref

qc = torch.ops.qc


def _x(M, K, seed=0):
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, None), (8, 32)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_canonical_linear_equals_reference(bits, group, symmetric):
    w, bias = _x(48, 128, 1), _x(1, 48, 2)[0]
    qw = quantize_weight(w, bits, group, symmetric)
    op = qc.w4a16_linear if bits == 4 else qc.w8a16_linear
    x = _x(5, 128).reshape(5, 1, 128)  # leading dims are kept
    y = op(x, *qw, bias)
    assert y.shape == (5, 1, 48)
    torch.testing.assert_close(y, F.linear(x, fake_quant_ref(w, bits, group, symmetric), bias))


def assert_close_bf16(y, ref):
    """bf16 activations, scales and outputs: max error within 1% of the output's range."""
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= 1e-2 * ref.abs().max().item(), f"max error {err} vs output range {ref.abs().max().item()}"


def _bf16_ref(x, w, bias):
    """What the fast path computes: bf16 activations and weights, fp32 accumulation."""
    return F.linear(x.bfloat16().float(), w.bfloat16().float(), bias)


@pytest.mark.parametrize("M", [1, 3, 17, ops.PACKED_MAX_ROWS + 1, 70])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_w4a16_cpu_fast_path(M, symmetric, group):
    w = _x(64, 256, 3)
    qw = quantize_weight(w, 4, group, symmetric)
    int4pack, sz = pack_int4_for_cpu(*qw)
    x, bias = _x(M, 256), _x(1, 64, 4)[0]
    y = qc.w4a16_linear_cpu(x, int4pack, sz, *qw, bias)
    ref = _bf16_ref(x, dequantize_weight_ref(*qw, bits=4), bias)
    assert_close_bf16(y, ref)
    assert_close_bf16(y, qc.w4a16_linear(x, *qw, bias))


native = pytest.mark.skipif(not cpu_native.available(), reason="our CPU kernel needs AVX-512 (F, BW) and g++")


@pytest.fixture(params=["vnni", "avx512", "avx2"])
def isa(request, cpu_isa):
    """Our kernels at each instruction-set level: the lower ones also on a CPU that has more."""
    if cpu_native.LEVELS[request.param] > cpu_native.LEVELS[cpu_native.ISA]:
        pytest.skip(f"this CPU lacks {request.param}")
    cpu_isa(request.param)
    return request.param


@native
@pytest.mark.parametrize("M", [1, 3, 4, 5, 8, 16, 23, ops.NATIVE_MAX_ROWS + 1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group,N", [(4, 32, 40), (4, 64, 64), (4, 128, 33), (4, 4, 16), (8, None, 40), (8, 64, 17)])
def test_native_kernel(M, symmetric, bits, group, N, isa):
    """Our int4/int8 kernel against the canonical op: fp32 activations and accumulation, so fp32
    tolerances (the dense bf16 path past NATIVE_MAX_ROWS: bf16 ones). N off the 16-channel block,
    row counts on and off the tiles (AVX-512, up to 4 rows: four accumulators a row; 5-8: two;
    9-16: one; AVX2: tiles of 4), a group of one 4-k step, int8 per channel and grouped. With
    VNNI, the linear of the activations as the kernel quantizes them (``int8_activations_ref``),
    except for a group not a multiple of 8 (packed for the FMA kernel)."""
    w = _x(N, 256, 3)
    qw = quantize_weight(w, bits, group, symmetric)
    x, bias = _x(M, 256), _x(1, N, 4)[0]
    packed = cpu_native.pack_native(*qw, bits)
    y = qc.wq_linear_native(x, *packed, *qw, bias, bits)
    vnni = cpu_native.vnni_layout(qw[0], qw[1], bits)
    assert vnni == (isa == "vnni" and group != 4) and (packed[0].shape[-1] == 64) == vnni
    xq = x
    if vnni and M <= ops.NATIVE_MAX_ROWS:
        xq = ops.int8_activations_ref(x, cpu_native.act_block(256 if group is None else group))
    ref = (qc.w4a16_linear if bits == 4 else qc.w8a16_linear)(xq, *qw, bias)
    if M <= ops.NATIVE_MAX_ROWS:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:
        assert_close_bf16(y, ref)
    assert y.dtype == x.dtype and y.shape == (M, N)


@native
@pytest.mark.parametrize("bf16", [False, True])
def test_many_rows_take_a_dense_gemm_in_the_cpus_fast_dtype(monkeypatch, bf16):
    """Past NATIVE_MAX_ROWS: dequantize + one GEMM, in bf16 where the CPU has bf16 hardware, in
    fp32 (fp32 tolerances) where bf16 would be emulated."""
    monkeypatch.setattr(cpu_native, "BF16_NATIVE", bf16)
    qw = quantize_weight(_x(40, 256, 3), 4, 64, False)
    x, bias = _x(ops.NATIVE_MAX_ROWS + 3, 256), _x(1, 40, 4)[0]
    y = ops.wq_linear_native_impl(x, *cpu_native.pack_native(*qw, 4), *qw, bias, 4)
    ref = qc.w4a16_linear(x, *qw, bias)
    if bf16:
        assert_close_bf16(y, ref)
        assert not torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())  # bf16 rounding shows
    else:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@native
def test_native_kernel_rejects_bad_layouts(isa):
    qw = quantize_weight(_x(32, 64, 3), 4, 32, False)
    packed, s, b = cpu_native.pack_native(*qw, 4)
    gemm = torch.ops.qc_cpu.wq_gemm
    with pytest.raises(RuntimeError, match="fp32"):
        gemm(_x(2, 64).bfloat16(), packed, s, b, 4, 32, 32, None)
    with pytest.raises(RuntimeError, match=r"VNNI-packed weights must be uint8 \[N/16, K/8" if isa == "vnni" else "packed must be uint8"):
        gemm(_x(2, 128), packed, s, b, 4, 32, 32, None)
    with pytest.raises(RuntimeError, match=r"VNNI-packed weights must be uint8 \[N/16, K/4" if isa == "vnni" else "packed must be int8"):
        gemm(_x(2, 64), packed, s, b, 8, 32, 32, None)
    with pytest.raises(RuntimeError, match="group size"):
        gemm(_x(2, 64), packed, s, b, 4, 6, 32, None)
    with pytest.raises(RuntimeError, match="bits"):
        gemm(_x(2, 64), packed, s, b, 3, 32, 32, None)
    if isa == "vnni":  # VNNI-packed weights, the kernels set below VNNI
        torch.ops.qc_cpu.set_isa(cpu_native.LEVELS["avx512"])
        with pytest.raises(RuntimeError, match="need a CPU with AVX512-VNNI"):
            gemm(_x(2, 64), packed, s, b, 4, 32, 32, None)


@pytest.mark.parametrize("M", [1, 5, ops.PACKED_MAX_ROWS + 3])
@pytest.mark.parametrize("symmetric", [True, False])
def test_w8a16_cpu_fast_path(M, symmetric):
    w = _x(48, 96, 5)
    qw = quantize_weight(w, 8, None, symmetric)
    x = _x(M, 96)
    y = qc.w8a16_linear_cpu(x, *qw, None)
    assert_close_bf16(y, _bf16_ref(x, dequantize_weight_ref(*qw, bits=8), None))
    assert_close_bf16(y, qc.w8a16_linear(x, *qw, None))


def test_cpu_fast_path_keeps_fp16_and_bf16_outputs():
    w = _x(32, 64, 6)
    qw = quantize_weight(w, 4, 32, True)
    int4pack, sz = pack_int4_for_cpu(*qw)
    for dt in (torch.bfloat16, torch.float16):
        assert qc.w4a16_linear_cpu(_x(2, 64).to(dt), int4pack, sz, *qw, None).dtype == dt


def test_opcheck_all_ops():
    w = _x(32, 64, 7)
    q4 = quantize_weight(w, 4, 32, False)
    q8 = quantize_weight(w, 8, None, False)
    x = _x(3, 64)
    int4pack, sz = pack_int4_for_cpu(*q4)
    torch.library.opcheck(qc.dequantize_weight, (*q4, 4))
    torch.library.opcheck(qc.w4a16_linear, (x, *q4, None))
    torch.library.opcheck(qc.w8a16_linear, (x, *q8, _x(1, 32)[0]))
    torch.library.opcheck(qc.w4a16_linear_cpu, (x, int4pack, sz, *q4, None))
    torch.library.opcheck(qc.w8a16_linear_cpu, (x, *q8, None))
    if cpu_native.available():
        torch.library.opcheck(qc.wq_linear_native, (x, *cpu_native.pack_native(*q4, 4), *q4, _x(1, 32)[0], 4))
        torch.library.opcheck(qc.wq_linear_native, (x, *cpu_native.pack_native(*q8, 8), *q8, None, 8))


def test_w8a16_cpu_survives_unaligned_weights():
    """safetensors may place a tensor at any offset; torch's int8pack kernel needs 64-byte alignment."""
    qw = quantize_weight(_x(16, 64, 8), 8, None, True)
    buf = torch.zeros(qw.qweight.numel() + 8, dtype=torch.int8)
    unaligned = buf[8:].view(16, 64)
    unaligned.copy_(qw.qweight)
    assert unaligned.data_ptr() % ops.CPU_ALIGN != 0
    x = _x(6, 64)
    torch.testing.assert_close(qc.w8a16_linear_cpu(x, unaligned, qw.scales, None, None),
                               qc.w8a16_linear_cpu(x, qw.qweight, qw.scales, None, None))
