"""Activation-quantizing ``qc::`` ops: W8A8 (int8 x int8) and FP8 (e4m3 x e4m3) linears.

Weight-only ops (``codegen.ops``) keep 16-bit activations; these also quantize the activation,
so that the GEMM itself can run on 8-bit operands (int8 / fp8 tensor cores, VNNI on CPU).
Both are symmetric: weights per output channel (scale ``[N, 1]``), activations per token
(scale ``[..., 1]``, computed from each row at run time) or, for int8, one static scale.
Scales are float32; outputs come back in ``x.dtype``. Each op computes its ``*_ref`` exactly.
"""
from typing import Optional

import torch
from torch import Tensor

INT8_MAX = 127
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
_TINY = torch.finfo(torch.float32).tiny

# NOTE: an fp32 sum of int8 x int8 products is exact while every partial sum stays below
# 2^24: K * 128 * 128 <= 2^24, i.e. K <= 1024. Longer products are summed in such chunks.
# TF32 or bf16 GEMM inputs (allow_tf32, matmul precision "medium") hold int8 values exactly too.
FP32_EXACT_MAX_K = 2 ** 24 // 128 ** 2


def absmax_scale(x: Tensor, qmax: float) -> Tensor:
    """float32 ``[..., 1]``: each row's absmax / ``qmax``, at least ``tiny`` so zero rows stay 0, not NaN."""
    return (x.float().abs().amax(-1, keepdim=True) / qmax).clamp_min(_TINY)


def _to_int8(x: Tensor, scale: Tensor) -> Tensor:
    return torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def _to_fp8(x: Tensor, scale: Tensor) -> Tensor:
    # NOTE: the clamp is needed: the cast does not saturate, past 448 it yields NaN.
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _rescale(acc: Tensor, x_scale: Tensor, weight_scale: Tensor, bias: Optional[Tensor], dtype) -> Tensor:
    """``acc [..., N] * x_scale [..., 1] * weight_scale^T (+ bias)`` in float32, then cast to ``dtype``."""
    y = acc.float() * x_scale.float() * weight_scale.float().reshape(-1)
    return (y if bias is None else y + bias.float()).to(dtype)


# --- weight quantization (done once, by the compiler) ----------------------------------

def quantize_weight_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """``w [N, K]`` -> (float8_e4m3fn ``[N, K]``, float32 scale ``[N, 1]`` = absmax / 448)."""
    scale = absmax_scale(w, FP8_MAX)
    return _to_fp8(w, scale), scale


# --- references -------------------------------------------------------------------------

def quantize_per_token_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x [..., K]`` -> (int8 ``clamp(round(x / s), -127, 127)``, float32 ``s [..., 1]`` = absmax / 127).
    ``round`` is half-to-even."""
    scale = absmax_scale(x, INT8_MAX)
    return _to_int8(x, scale), scale


def w8a8_linear_ref(x: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                    input_scale: Optional[Tensor]) -> Tensor:
    """``(q_x @ q_w^T) * s_x * s_w^T (+ bias)`` in ``x.dtype``; ``s_x`` per token if ``input_scale`` is
    None, else that static scalar. The integer product is taken in float64, exact for any real K."""
    if input_scale is None:
        qx, sx = quantize_per_token_ref(x)
    else:
        sx = input_scale.float().reshape(())
        qx = _to_int8(x, sx)
    acc = qx.double() @ qweight.double().T  # [..., N]
    return _rescale(acc, sx, weight_scale, bias, x.dtype)


def fp8_linear_ref(x: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``(fp8(x / s_x) @ q_w^T) * s_x * s_w^T (+ bias)`` in ``x.dtype``, ``s_x`` = absmax / 448 per token,
    the product in float32."""
    sx = absmax_scale(x, FP8_MAX)
    acc = _to_fp8(x, sx).float() @ qweight.float().T  # [..., N]
    return _rescale(acc, sx, weight_scale, bias, x.dtype)


# --- implementations --------------------------------------------------------------------

def int8_mm_via_fp32(a: Tensor, w: Tensor) -> Tensor:
    """int8 ``a [M, K]`` @ int8 ``w [N, K]``^T -> int32 ``[M, N]``, exact on any device: fp32 GEMMs over
    K-chunks short enough to be exact (``FP32_EXACT_MAX_K``), summed in int32."""
    acc = a.new_zeros(a.shape[0], w.shape[0], dtype=torch.int32)
    for k in range(0, a.shape[1], FP32_EXACT_MAX_K):
        chunk = slice(k, k + FP32_EXACT_MAX_K)
        acc += (a[:, chunk].float() @ w[:, chunk].float().T).to(torch.int32)
    return acc


def _int8_mm(a: Tensor, w: Tensor) -> Tensor:
    # NOTE: torch._int_mm on CPU takes any shape and a transposed weight view, and is exact
    # (int32 accumulation; overflow needs K > 2^31 / 128^2 = 131072). On CUDA it has shape and
    # layout conditions (K, N multiples of 8; M > 16 in some releases), so other devices use
    # the fp32 path.
    if a.device.type == "cpu":
        return torch._int_mm(a, w.T)
    return int8_mm_via_fp32(a, w)


def quantize_per_token_impl(x: Tensor) -> tuple[Tensor, Tensor]:
    return quantize_per_token_ref(x)


def w8a8_linear_impl(x: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                     input_scale: Optional[Tensor]) -> Tensor:
    """``x [..., K]`` float @ int8 ``qweight [N, K]`` -> ``[..., N]``, an int8 GEMM with int32 accumulation."""
    x2 = x.reshape(-1, x.shape[-1])
    if input_scale is None:
        qx, sx = quantize_per_token_ref(x2)
    else:
        sx = input_scale.float().reshape(())
        qx = _to_int8(x2, sx)
    y = _rescale(_int8_mm(qx, qweight), sx, weight_scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def fp8_linear_impl(x: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x [..., K]`` float @ float8_e4m3fn ``qweight [N, K]`` -> ``[..., N]``. Upcasts to float32 on every
    device, so every device computes the reference's result (``torch._scaled_mm`` differs in the last bits)."""
    return fp8_linear_ref(x, qweight, weight_scale, bias)


# NOTE: the plain functions stay importable: an eager program calls them directly,
# skipping the custom-op dispatch.
quantize_per_token = torch.library.custom_op("qc::quantize_per_token", quantize_per_token_impl, mutates_args=())
w8a8_linear = torch.library.custom_op("qc::w8a8_linear", w8a8_linear_impl, mutates_args=())
fp8_linear = torch.library.custom_op("qc::fp8_linear", fp8_linear_impl, mutates_args=())


@quantize_per_token.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(*x.shape[:-1], 1, dtype=torch.float32)


@w8a8_linear.register_fake
def _(x, qweight, weight_scale, bias, input_scale):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@fp8_linear.register_fake
def _(x, qweight, weight_scale, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
