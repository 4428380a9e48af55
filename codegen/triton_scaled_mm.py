"""Triton kernels for the activation-quantizing ops ``qc::quantize_per_token``, ``qc::w8a8_linear`` and
``qc::fp8_linear`` (registered as their CUDA kernels), computing the ``*_ref`` of ``codegen.act_quant``.

Two launches per linear: ``_quantize_rows_kernel`` (one program per token: absmax, scale, codes),
then ``_scaled_mm_kernel``, an 8-bit ``tl.dot`` GEMM (int8 -> int32, e4m3 -> fp32) that reads the
weight in its canonical ``[N, K]`` layout (K-major, as 8-bit tensor cores want both operands) and
applies ``acc * s_x[m] * s_w[n] (+ bias)`` in fp32 before the cast to ``x.dtype``.

Numerics match the references bit for bit where they can: divisions are ``div_rn`` (Triton's ``/``
is approximate on NVIDIA GPUs), round-half-to-even is spelled out with ``floor`` (the interpreter has
no ``rint``), fp8 codes are rounded onto the e4m3 grid in fp32 before the cast (the interpreter's fp8
cast does not round to even), and the epilogue is compiled without FMA contraction.
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import act_quant
from .cuda import cdiv, num_sms
from .act_quant import FP8_DTYPE, FP8_MAX, INT8_MAX, fp8_linear_ref, quantize_per_token_ref, w8a8_linear_ref

__all__ = ["GemmConfig", "fp8_linear_ref", "fp8_linear_triton", "pick_gemm_config", "quantize_per_token_fp8_triton",
           "quantize_per_token_ref", "quantize_per_token_triton", "scaled_mm_triton", "w8a8_linear_ref",
           "w8a8_linear_triton"]

_TINY = tl.constexpr(2.0 ** -126)  # torch.finfo(torch.float32).tiny, the smallest per-token scale


@triton.jit
def _round_half_even(v):
    """``torch.round`` of fp32 ``v`` (as fp32): ``v - floor(v)`` is exact, so ties are seen exactly."""
    r = tl.floor(v)
    d = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)


@triton.jit
def _round_to_e4m3(v):
    """fp32 ``v`` (``|v| <= 448``) rounded half-to-even onto the float8_e4m3fn grid, still fp32 and signed
    like ``v`` (-0 included): 3 mantissa bits, so the step is ``2^(e - 3)``, ``2^-9`` for subnormals."""
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # the binade's exponent; e4m3 subnormals below 2^-6
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # powers of two: the scalings are exact
    inv_step = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)
    r = _round_half_even(tl.abs(v) * inv_step) * step
    return r * tl.where(bits < 0, -1.0, 1.0)  # NOTE: not ``-r``: Triton negates as ``0 - r``, which drops -0


@triton.jit
def _codes(x, scale, QMAX: tl.constexpr, FP8: tl.constexpr):
    """fp32 ``x`` -> the fp32 value of its code: ``round(clamp(x / scale, ±QMAX))`` to int8 or e4m3."""
    v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -QMAX), QMAX)
    if FP8:
        return _round_to_e4m3(v)
    else:
        return _round_half_even(v)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, static_scale_ptr, K, stride_xm, stride_xk, stride_qm,
                          QMAX: tl.constexpr, FP8: tl.constexpr, STATIC: tl.constexpr, ONE_BLOCK: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """One row: ``s = max(absmax / QMAX, tiny)`` (or the static scale), ``q = code(clamp(x / s, ±QMAX))``.
    A row that fits one block (``ONE_BLOCK``) is read once; a longer one twice, block by block."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    if ONE_BLOCK:
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_row + offs * stride_xk, mask=mask, other=0.0).to(tl.float32)
        if STATIC:
            scale = tl.load(static_scale_ptr)
        else:
            scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=0), QMAX), _TINY)
            tl.store(s_ptr + row, scale)
        tl.store(q_row + offs, _codes(x, scale, QMAX, FP8).to(q_ptr.dtype.element_ty), mask=mask)
    else:
        if STATIC:
            scale = tl.load(static_scale_ptr)
        else:
            amax = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), QMAX), _TINY)
            tl.store(s_ptr + row, scale)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < K
            x = tl.load(x_row + offs * stride_xk, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + offs, _codes(x, scale, QMAX, FP8).to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scaled_mm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K,
                      stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_sa, stride_sb,
                      HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, MAX_IMPRECISE_ACC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """``c [M, N] = (a [M, K] @ b [N, K]^T) * sa [M] * sb [N] (+ bias [N])``; 8-bit a and b."""
    # grouped ordering: GROUP_M row-tiles sweep the N tiles together, so their b tiles stay in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # NOTE: rows/columns past M/N wrap around (loads stay in bounds unmasked); their results are not stored.
    offs_am = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M)
    offs_bn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + offs_bn[None, :] * stride_bn + offs_k[:, None] * stride_bk  # [BLOCK_K, BLOCK_N], K-major
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=MAX_IMPRECISE_ACC, out_dtype=ACC_DTYPE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask_m = offs_m < M
    mask_n = offs_n < N
    sa = tl.load(sa_ptr + offs_m * stride_sa, mask=mask_m, other=0.0)
    sb = tl.load(sb_ptr + offs_n * stride_sb, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --- configs ------------------------------------------------------------------------------

class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


QUANT_MAX_BLOCK = 8192  # rows up to this long are read once, from registers


def pick_gemm_config(M: int, N: int, fp8: bool, fast_accum: bool, device: torch.device) -> GemmConfig:
    """Tiles by M (the rules and their measurements: ``bench/RESULTS.md``).

    Decode (M <= 16) reads the weight once, memory-bound: 16-row tiles, and long K tiles (many
    bytes in flight) with N tiles narrow enough to give every SM a program. Up to 64 rows, 64-row
    tiles, again narrow when there are few. Prefill: 128 x 128 tiles, 8 warps, grouped ordering
    for L2 reuse; fp8 that promotes its accumulator takes 4 stages (it holds two accumulators),
    the others 3, fast-accumulating fp8 256-wide tiles once they fill the SMs."""
    sms = num_sms(device)
    if M <= 16:
        if cdiv(N, 64) >= sms:
            return GemmConfig(16, 64, 256, 1, 4, 4)
        return GemmConfig(16, 32, 512, 1, 4, 4)
    if M <= 64:
        if cdiv(M, 64) * cdiv(N, 64) >= sms:
            return GemmConfig(64, 64, 128, 8, 4, 4)
        return GemmConfig(64, 32, 256, 8, 4, 4)
    if not fp8:
        return GemmConfig(128, 128, 128, 8, 8, 3)
    if not fast_accum:
        return GemmConfig(128, 128, 128, 8, 8, 4)
    if cdiv(M, 128) * cdiv(N, 256) >= sms:
        return GemmConfig(128, 256, 128, 8, 8, 3)
    return GemmConfig(128, 128, 128, 8, 8, 3)


# --- wrappers -----------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_activation(x: Tensor, name: str = "x") -> None:
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32/float16/bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must be [..., K] with K > 0, got {tuple(x.shape)}")


def _quantize_rows(x2: Tensor, qdtype: torch.dtype, static_scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``x2 [M, K]`` (any strides) -> (codes ``[M, K]`` in ``qdtype``, float32 scales ``[M, 1]``, or
    ``static_scale`` itself, a float32 ``[1]``, when given)."""
    M, K = x2.shape
    q = torch.empty(M, K, device=x2.device, dtype=qdtype)
    s = static_scale if static_scale is not None else torch.empty(M, 1, device=x2.device, dtype=torch.float32)
    if M:
        block_k = min(triton.next_power_of_2(K), QUANT_MAX_BLOCK)
        _quantize_rows_kernel[(M,)](
            x2, q, s, s, K, x2.stride(0), x2.stride(1), q.stride(0),
            QMAX=float(FP8_MAX if qdtype == FP8_DTYPE else INT8_MAX), FP8=qdtype == FP8_DTYPE,
            STATIC=static_scale is not None, ONE_BLOCK=K <= block_k, BLOCK_K=block_k,
            num_warps=4 if block_k <= 1024 else 8 if block_k <= 4096 else 16)
    return q, s


def quantize_per_token_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x [..., K]`` -> (int8 ``[..., K]``, float32 scale ``[..., 1]``): ``quantize_per_token_ref``."""
    _check_activation(x)
    q, s = _quantize_rows(x.reshape(-1, x.shape[-1]), torch.int8, None)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


def quantize_per_token_fp8_triton(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x [..., K]`` -> (float8_e4m3fn ``[..., K]``, float32 scale ``[..., 1]`` = absmax / 448): the
    activation half of ``fp8_linear_ref``."""
    _check_activation(x)
    q, s = _quantize_rows(x.reshape(-1, x.shape[-1]), FP8_DTYPE, None)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], 1)


def scaled_mm_triton(a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor, bias: Optional[Tensor],
                     out_dtype: torch.dtype, config: Optional[GemmConfig] = None, fast_accum: bool = False) -> Tensor:
    """``(a [M, K] @ b [N, K]^T) * a_scale * b_scale^T (+ bias)`` -> ``[M, N]`` in ``out_dtype``.

    Args:
        a, b: both int8 (int32 accumulation, exact) or both float8_e4m3fn (fp32 accumulation).
        a_scale: float32 ``[M, 1]`` per row, or ``[1]`` for all rows.
        b_scale: float32, ``N`` elements (``[N, 1]``).
        bias: ``[N]`` or None, added in fp32.
        config: tiles; ``pick_gemm_config`` when None.
        fast_accum: fp8 on Hopper only: leave the sums in the tensor cores' own accumulator, which
            keeps fewer bits than fp32, instead of promoting them to fp32 once per K tile (the
            default); less exact (``torch._scaled_mm``'s ``use_fast_accum``).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a must be [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in (torch.int8, FP8_DTYPE):
        raise ValueError(f"a and b must both be int8 or both float8_e4m3fn, got {a.dtype} and {b.dtype}")
    (M, K), N = a.shape, b.shape[0]
    if a_scale.dtype != torch.float32 or a_scale.numel() not in (1, M) or a_scale.dim() > 2:
        raise ValueError(f"a_scale must be float32 [{M}, 1] or [1], got {a_scale.dtype} {tuple(a_scale.shape)}")
    if b_scale.dtype != torch.float32 or b_scale.numel() != N:
        raise ValueError(f"b_scale must be float32 [{N}, 1], got {b_scale.dtype} {tuple(b_scale.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    if b.stride(1) != 1:
        raise ValueError(f"b must be [N, K] with K contiguous (the canonical weight layout), got strides {b.stride()}")
    for t in (b, a_scale, b_scale, bias):
        if t is not None and t.device != a.device:
            raise ValueError(f"all operands must be on {a.device}, got one on {t.device}")
    out = torch.empty(M, N, device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out
    is_fp8 = a.dtype == FP8_DTYPE
    cfg = config or pick_gemm_config(M, N, is_fp8, fast_accum, a.device)
    grid = (cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n),)
    _scaled_mm_kernel[grid](
        a, b, out, a_scale, b_scale, bias if bias is not None else b_scale, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        0 if a_scale.numel() == 1 else a_scale.reshape(-1).stride(0), b_scale.reshape(-1).stride(0),
        HAS_BIAS=bias is not None, ACC_DTYPE=tl.float32 if is_fp8 else tl.int32,
        # NOTE: fp8 on Hopper: the tensor cores' own (narrower) accumulator is added into the fp32 one
        # once per K tile unless fast_accum (None: Triton's default, never); int8 and the interpreter ignore it.
        MAX_IMPRECISE_ACC=(None if fast_accum else cfg.block_k) if is_fp8 else 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=False)  # NOTE: no FMA in the epilogue: it must round like the reference
    return out


def _check_linear(x: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                  qdtype: torch.dtype, input_scale: Optional[Tensor] = None) -> None:
    _check_activation(x)
    for t in (qweight, weight_scale, bias, input_scale):
        if t is not None and t.device != x.device:
            raise ValueError(f"all operands must be on {x.device}, got one on {t.device}")
    if qweight.dtype != qdtype or qweight.dim() != 2 or qweight.shape[1] != x.shape[-1]:
        raise ValueError(f"qweight must be {qdtype} [N, {x.shape[-1]}], got {qweight.dtype} {tuple(qweight.shape)}")
    if weight_scale.numel() != qweight.shape[0] or not weight_scale.is_floating_point():
        raise ValueError(f"weight_scale must be float [{qweight.shape[0]}, 1], got {weight_scale.dtype} "
                         f"{tuple(weight_scale.shape)}")
    if bias is not None and bias.shape != (qweight.shape[0],):
        raise ValueError(f"bias must be [{qweight.shape[0]}], got {tuple(bias.shape)}")


def w8a8_linear_triton(x: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                       input_scale: Optional[Tensor]) -> Tensor:
    """``x [..., K]`` float @ int8 ``qweight [N, K]`` -> ``[..., N]`` in ``x.dtype``: ``w8a8_linear_ref``,
    activations quantized per token, or with the static scalar ``input_scale`` when given."""
    _check_linear(x, qweight, weight_scale, bias, torch.int8, input_scale)
    if input_scale is not None and input_scale.numel() != 1:
        raise ValueError(f"input_scale must be a scalar (one element), got {tuple(input_scale.shape)}")
    static = None if input_scale is None else input_scale.float().reshape(1)
    qx, sx = _quantize_rows(x.reshape(-1, x.shape[-1]), torch.int8, static)
    y = scaled_mm_triton(qx, qweight, sx, weight_scale.float(), bias, x.dtype)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def fp8_linear_triton(x: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Optional[Tensor],
                      fast_accum: bool = False) -> Tensor:
    """``x [..., K]`` float @ float8_e4m3fn ``qweight [N, K]`` -> ``[..., N]`` in ``x.dtype``: ``fp8_linear_ref``
    (activations per token, absmax / 448); ``fast_accum`` as in ``scaled_mm_triton``."""
    _check_linear(x, qweight, weight_scale, bias, FP8_DTYPE)
    qx, sx = _quantize_rows(x.reshape(-1, x.shape[-1]), FP8_DTYPE, None)
    y = scaled_mm_triton(qx, qweight, sx, weight_scale.float(), bias, x.dtype, fast_accum=fast_accum)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


act_quant.quantize_per_token.register_kernel("cuda")(quantize_per_token_triton)
act_quant.w8a8_linear.register_kernel("cuda")(w8a8_linear_triton)
act_quant.fp8_linear.register_kernel("cuda")(fp8_linear_triton)
