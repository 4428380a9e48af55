"""The ``qc::`` ops: fake kernels for export, readable references, fast CPU paths.

Canonical ops take the artifact's kernel-neutral layout (``codegen.quant``) and compute
exactly their reference on every device. ``lower_for_cpu`` (``codegen.cpu``) swaps them,
at load time, for the ``*_cpu`` ops below, which run torch's packed CPU kernels with
16-bit (bf16) activations — the "A16" of W4A16/W8A16 — and fp32 accumulation.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_native
from .quant import dequantize_weight_ref

# NOTE: torch's int4/int8 packed CPU kernels are per-row GEMVs: they beat a dense bf16
# GEMM only for a few rows. Past this many rows a dequantize + bf16 GEMM wins (bench/linear_cpu.py).
PACKED_MAX_ROWS = 64
# Our own int4/int8 kernel (codegen.cpu_native) converts a weight block once for 4 rows; past this
# many rows a dequantize + GEMM wins (``_dense``; bench/linear_cpu.py).
NATIVE_MAX_ROWS = 64


def quantized_linear_ref(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                         bias: Optional[Tensor], bits: int) -> Tensor:
    """``F.linear(x, (q - zero) * scale, bias)`` in ``x.dtype``."""
    w = dequantize_weight_ref(qweight, scales, zeros, bits).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def int8_activations_ref(x: Tensor, block: int) -> Tensor:
    """What the VNNI kernel (``codegen.cpu_native``) multiplies: fp32 ``x`` quantized to int8 per
    row and block of ``block`` k's, symmetric (``sx = absmax / 127``, ``q = round(x * (127 / absmax))``,
    ties to even), dequantized as ``q * sx``."""
    xb = x.float().reshape(*x.shape[:-1], -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv).clamp(-127, 127)
    return (q * (amax / 127)).reshape(x.shape)


def _out_features(qweight: Tensor) -> int:
    return qweight.shape[0]


# --- dequantize (the q/dq form the quantize pass inserts, before fusion) ---------------

@torch.library.custom_op("qc::dequantize_weight", mutates_args=())
def dequantize_weight(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int) -> Tensor:
    return dequantize_weight_ref(qweight, scales, zeros, bits)


@dequantize_weight.register_fake
def _(qweight, scales, zeros, bits):
    K = qweight.shape[1] * (2 if bits == 4 else 1)
    return scales.new_empty(qweight.shape[0], K)


# --- weight-only linears, canonical layout -------------------------------------------

@torch.library.custom_op("qc::w4a16_linear", mutates_args=())
def w4a16_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                 bias: Optional[Tensor]) -> Tensor:
    """``x [..., K]`` @ int4 weight (uint8 ``[N, K/2]``, scales/zeros ``[N, K/G]``) -> ``[..., N]``."""
    return quantized_linear_ref(x, qweight, scales, zeros, bias, bits=4)


@torch.library.custom_op("qc::w8a16_linear", mutates_args=())
def w8a16_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                 bias: Optional[Tensor]) -> Tensor:
    """``x [..., K]`` @ int8 weight (int8 ``[N, K]``, scales/zeros ``[N, K/G]``) -> ``[..., N]``."""
    return quantized_linear_ref(x, qweight, scales, zeros, bias, bits=8)


@w4a16_linear.register_fake
def _(x, qweight, scales, zeros, bias):
    return x.new_empty(*x.shape[:-1], _out_features(qweight))


@w8a16_linear.register_fake
def _(x, qweight, scales, zeros, bias):
    return x.new_empty(*x.shape[:-1], _out_features(qweight))


# --- CPU fast paths (layouts prepared once at load time by codegen.cpu) ----------------

def _dequantize(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, dtype: torch.dtype) -> Tensor:
    """``(q - 8 [int4] - zero) * scale`` as ``q * scale + offset`` in fp32, the offset per group:
    one pass over the weight after the unpack, not three; then ``dtype``."""
    f32 = torch.float32
    q = torch.stack([qweight & 0xF, qweight >> 4], dim=-1).to(f32) if bits == 4 else qweight.to(f32)
    N, ngroups = scales.shape
    s = scales.to(f32)
    shift = (zeros.to(f32) if zeros is not None else torch.zeros_like(s)) + (8.0 if bits == 4 else 0.0)
    w = torch.addcmul(-(shift * s).unsqueeze(-1), q.reshape(N, ngroups, -1), s.unsqueeze(-1)).reshape(N, -1)
    return w.to(dtype)


def _dense(x2: Tensor, qweight, scales, zeros, bits) -> Tensor:
    """Dequantize, then one GEMM: in bf16 where the CPU multiplies bf16 natively (AVX512-BF16 or
    AMX), else in fp32 (oneDNN's emulated bf16 GEMM is slower than MKL's fp32 one there)."""
    dtype = torch.bfloat16 if cpu_native.BF16_NATIVE else torch.float32
    return F.linear(x2.to(dtype), _dequantize(qweight, scales, zeros, bits, dtype))


def _finish(y: Tensor, x: Tensor, bias: Optional[Tensor]) -> Tensor:
    y = y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias.to(x.dtype)


CPU_ALIGN = 64


def aligned(t: Tensor) -> Tensor:
    """``t``, or a copy of it at a 64-byte-aligned address: torch's int8pack CPU kernel reads
    weights with aligned vector loads and crashes on tensors that safetensors placed elsewhere.
    Under ``torch.compile`` the weights are the load-time lowering's own, freshly allocated (aligned)
    tensors, and the check (a pointer read Dynamo cannot trace) is skipped."""
    if torch.compiler.is_compiling():
        return t
    return t if t.data_ptr() % CPU_ALIGN == 0 and t.is_contiguous() else t.contiguous().clone()


def w4a16_linear_cpu_impl(x: Tensor, int4pack: Tensor, scales_and_zeros: Tensor, qweight: Tensor,
                     scales: Tensor, zeros: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """``qc::w4a16_linear`` on CPU: torch's int4pack kernel (``int4pack``, ``scales_and_zeros``
    from ``codegen.cpu.pack_int4_for_cpu``) for few rows, a bf16 dequantize + GEMM for many."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= PACKED_MAX_ROWS:
        group_size = x.shape[-1] // scales.shape[1]
        y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), aligned(int4pack), group_size,
                                              aligned(scales_and_zeros))
    else:
        y = _dense(x2, qweight, scales, zeros, bits=4)
    return _finish(y, x, bias)


def w8a16_linear_cpu_impl(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                     bias: Optional[Tensor]) -> Tensor:
    """``qc::w8a16_linear`` on CPU for per-channel weights: torch's int8pack kernel for few rows
    (an asymmetric zero point is a rank-1 correction ``- rowsum(x) * zero * scale``), a bf16
    dequantize + GEMM for many."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= PACKED_MAX_ROWS:
        xb = x2.to(torch.bfloat16)
        s = scales.reshape(-1).to(torch.bfloat16)
        y = torch._weight_int8pack_mm(xb, aligned(qweight), s).float()
        if zeros is not None:
            y = y - xb.float().sum(-1, keepdim=True) * (zeros.reshape(-1).float() * scales.reshape(-1).float())
    else:
        y = _dense(x2, qweight, scales, zeros, bits=8)
    return _finish(y, x, bias)


def wq_linear_native_impl(x: Tensor, packed: Tensor, block_scales: Tensor, block_biases: Tensor,
                          qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bias: Optional[Tensor],
                          bits: int) -> Tensor:
    """``qc::w4a16_linear`` / ``qc::w8a16_linear`` on CPU through our own kernel
    (``codegen.cpu_native``: fp32 activations and accumulation, weights from ``pack_native``)
    for up to ``NATIVE_MAX_ROWS`` rows, a dequantize + GEMM for more (``_dense``'s, in C++:
    ``qc_cpu::wq_linear`` decides inside, so a compiled program has no branch on the row count)."""
    return torch.ops.qc_cpu.wq_linear(x, packed, block_scales, block_biases, qweight, scales, zeros, bias, bits,
                                      NATIVE_MAX_ROWS, cpu_native.BF16_NATIVE)


# NOTE: the plain functions stay importable: an eager program calls them directly
# (``codegen.cpu.call_directly``), skipping custom-op dispatch.
w4a16_linear_cpu = torch.library.custom_op("qc::w4a16_linear_cpu", w4a16_linear_cpu_impl, mutates_args=())
w8a16_linear_cpu = torch.library.custom_op("qc::w8a16_linear_cpu", w8a16_linear_cpu_impl, mutates_args=())
wq_linear_native = torch.library.custom_op("qc::wq_linear_native", wq_linear_native_impl, mutates_args=())


@wq_linear_native.register_fake
def _(x, packed, block_scales, block_biases, qweight, scales, zeros, bias, bits):
    return x.new_empty(*x.shape[:-1], _out_features(qweight))


@w4a16_linear_cpu.register_fake
def _(x, int4pack, scales_and_zeros, qweight, scales, zeros, bias):
    return x.new_empty(*x.shape[:-1], _out_features(qweight))


@w8a16_linear_cpu.register_fake
def _(x, qweight, scales, zeros, bias):
    return x.new_empty(*x.shape[:-1], _out_features(qweight))


def linear_bf16(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """A float linear with 16-bit activations and a bf16 copy of its weight (made once at load):
    how a weight-only artifact serves the layers it left float, lm_head first."""
    # NOTE: flattened to 2-D first: CUDA's linear on a 3-D input with a symbolic length asks for
    # numel() while the graph is traced with fake tensors
    y = F.linear(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), weight, None if bias is None else bias.to(torch.bfloat16))
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)
