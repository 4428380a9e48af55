"""Triton kernels for the weight-only linears ``qc::w4a16_linear`` and ``qc::w8a16_linear``
(registered as their CUDA kernels): dequantization fused into the GEMM.

The kernels read the artifact's own layout: int4 as uint8 ``[N, K/2]`` (column ``2j`` in the
low nibble, ``2j + 1`` in the high one), so a weight tile ``[BLOCK_N, BLOCK_K/2]`` is contiguous
along K and loads as 16-byte vectors without any repacking. In ``_wq_linear_kernel`` the
activation tile ``[BLOCK_M, BLOCK_K]`` loads contiguously too and is split into its even and odd
columns in registers, which meet the low and high nibble planes; the group's scale multiplies
the tile's fp32 partial product, and a zero point is one rank-1 correction per group
(``- rowsum(x_group) * zero * scale``), so the inner loop does no per-weight float math beyond
the int -> float conversion. Scales and zeros are read through their strides: the runtime
stores them N-contiguous (``codegen.cuda``), one coalesced row per group.

The kernels, by ``LinearConfig.form`` (the decode-size streams live in ``triton_gemv``):

* ``planes`` (``_wq_linear_kernel``): for ``M <= GEMV_MAX_M`` the few rows multiply the weight
  tile in registers and reduce along K every tile (a GEMV); for larger M, ``tl.dot`` on the two
  nibble planes as integer-valued 16-bit tiles, the weights the right operand;
* ``stream`` / ``words`` (``triton_gemv``): decode sizes, per-lane sums across the whole K split,
  each weight dequantized once for all rows by the bits of its code;
* ``swap`` (``_wq_dot_swap_kernel``): larger M, ``out^T = W @ x^T``, the dequantized weights the
  left operand, from registers, codes made 16-bit floats by their bits;
* ``dequant`` (``_wq_dequant_kernel``, then ``F.linear``): prefill sizes. A fused kernel
  dequantizes every weight once per M tile, so its cost grows with M; this form writes the
  weight once in ``x.dtype`` and hands it to the vendor GEMM (cuBLAS), for a fixed cost of
  ~2.5 bytes per weight on top of the float GEMM (and a temporary ``[N, K]`` weight per call),
  which is the reference's own computation.

``pick_config``'s rules (``triton_linear_tiles``) choose ``words``/``stream``, ``swap`` and
``dequant``; ``planes`` runs where a tuned table or a ``config`` names it. Split over K, a call
is one launch (``triton_linear_common._write_out``).

The dequantized weight is ``dequantize_weight_ref``'s exactly when the scales are in x's dtype
(the usual case: both follow the model's dtype) or, for ``dequant``, in fp32: the reference
rounds each weight to the scales' dtype before x's, the kernels round once, to x's.
"""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import ops
from .cuda import cdiv, pow2_divisor
from .triton_gemv import _w4_gemv_words_kernel, _wq_gemv_stream_kernel
from .triton_linear_common import _group_params, _tile, _write_out
from .triton_linear_tiles import FORMS, LinearConfig, pick_config
from .workspace import split_workspace

_EXP_BITS16 = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}  # magic bits, value of code 0


@triton.jit
def _wq_linear_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,
                      M, N, K, k_per_split,
                      stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                      stride_om, stride_on,
                      BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
                      HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                      USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_mn, offs_m, offs_n, mask_m, mask_n, k_start, k_end = _tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # per-channel zero point: rowsum of x over this split
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)          # [BLOCK_M, BLOCK_K]
        if BITS == 4:
            HALF: tl.constexpr = BLOCK_K // 2
            offs_b = k0 // 2 + tl.arange(0, HALF)                                # byte columns of this tile
            b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :] * stride_wk,
                        mask=mask_n[:, None] & (offs_b < k_end // 2)[None, :], other=0x88)  # [BLOCK_N, HALF] uint8
            lo = (b & 0xF).to(tl.int16) - 8
            hi = (b >> 4).to(tl.int16) - 8
            x_even, x_odd = tl.split(tl.reshape(xt, (BLOCK_M, HALF, 2)))         # [BLOCK_M, HALF] each
            if USE_DOT:
                part = tl.dot(x_even, tl.trans(lo.to(dt)), input_precision=DOT_PRECISION)
                part = tl.dot(x_odd, tl.trans(hi.to(dt)), part, input_precision=DOT_PRECISION)
            else:
                prod = (x_even.to(tl.float32)[:, None, :] * lo.to(tl.float32)[None, :, :]
                        + x_odd.to(tl.float32)[:, None, :] * hi.to(tl.float32)[None, :, :])
                part = tl.sum(prod, axis=2)
        else:
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=mask_n[:, None] & mask_k[None, :], other=0)           # [BLOCK_N, BLOCK_K] int8
            if USE_DOT:
                part = tl.dot(xt, tl.trans(w.to(dt)), input_precision=DOT_PRECISION)
            else:
                part = tl.sum(xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        if HAS_ZERO:
            xs = tl.sum(xt.to(tl.float32), axis=1)
        if PER_CHANNEL:
            acc += part
            if HAS_ZERO:
                xsum += xs
        else:
            g = k0 // GROUP
            s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
            acc += part * s[None, :]
            if HAS_ZERO:
                z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0).to(tl.float32)
                acc -= xs[:, None] * (z * s)[None, :]
    if PER_CHANNEL:
        s = tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + offs_n * stride_zn, mask=mask_n, other=0).to(tl.float32)
            acc = (acc - xsum[:, None] * z[None, :]) * s[None, :]
        else:
            acc = acc * s[None, :]
    _write_out(acc, offs_m, offs_n, mask_m, mask_n, N, out_ptr, stride_om, stride_on, b_ptr, ws_ptr, lock_ptr,
               pid_mn, tl.num_programs(1), HAS_BIAS, SPLIT)


@triton.jit
def _wq_dot_swap_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,
                        M, N, K, k_per_split,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                        stride_om, stride_on,
                        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SPLIT: tl.constexpr, EXP_MAGIC: tl.constexpr, EXP_BASE: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The tensor-core form with the operands swapped: ``out^T [BLOCK_N, BLOCK_M] = W [BLOCK_N,
    BLOCK_K] @ x^T``. The weights, dequantized in registers, are the left operand (Hopper's wgmma
    takes its left operand from registers, the right one from shared memory), so they never make
    a round trip through shared memory, and the few rows of x are the right operand. The nibble
    planes are interleaved back into K order (``join`` + ``reshape``), one dot per tile. The
    weights are dequantized in x's dtype before the dot, ``(codes - offset) * scale`` (the
    offset is ``8 + zero`` for int4, ``zero`` for int8, plus ``EXP_BASE``): the difference is an
    exact small integer, so the one rounding is the scale product's, and with scales in x's dtype
    the weight is the one ``dequantize_weight_ref`` makes. The dot then accumulates in place: no
    per-tile fp32 scaling of a partial product and no rank-1 correction with x's row sums, whose
    cost per weight would grow with BLOCK_M. With ``EVEN_K`` (every K tile whole, always so with
    groups) the loop's loads take no masks. ``EXP_MAGIC``: 16-bit activations take int4 codes by
    their bits (``0x4300 | code`` is ``128 + code`` in bf16, ``0x6400 | code`` is ``1024 + code``
    in fp16) instead of an int -> float conversion."""
    pid_mn, offs_m, offs_n, mask_m, mask_n, k_start, k_end = _tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # EVEN_K (every K tile whole): rows past M and N wrap around instead of being masked, so the
    # loop's loads take no masks; those rows' sums are never stored
    rows_x = offs_m % M if EVEN_K else offs_m
    rows_w = offs_n % N if EVEN_K else offs_n
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x_ptrs = x_ptr + rows_x[:, None] * stride_xm + offs_k[None, :] * stride_xk
        if EVEN_K:
            xt = tl.load(x_ptrs)                                                   # [BLOCK_M, BLOCK_K]
        else:
            xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if BITS == 4:
            HALF: tl.constexpr = BLOCK_K // 2
            offs_b = k0 // 2 + tl.arange(0, HALF)
            w_ptrs = w_ptr + rows_w[:, None] * stride_wn + offs_b[None, :] * stride_wk
            if EVEN_K:
                b = tl.load(w_ptrs)                                                # [BLOCK_N, HALF] uint8
            else:
                b = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_b < k_end // 2)[None, :], other=0)
            if EXP_MAGIC != 0:
                lo = ((b & 0xF).to(tl.int16) | EXP_MAGIC).to(dt, bitcast=True)
                hi = ((b >> 4).to(tl.int16) | EXP_MAGIC).to(dt, bitcast=True)
            else:
                lo = (b & 0xF).to(dt)
                hi = (b >> 4).to(dt)
            w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))                # columns back in K order
        else:
            w_ptrs = w_ptr + rows_w[:, None] * stride_wn + offs_k[None, :] * stride_wk
            if EVEN_K:
                w = tl.load(w_ptrs).to(dt)                                         # [BLOCK_N, BLOCK_K]
            else:
                w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0).to(dt)
        s, off = _group_params(s_ptr, z_ptr, rows_w, mask_n, k0, stride_sn, stride_sg, stride_zn, stride_zg,
                               GROUP, HAS_ZERO, 8.0 + EXP_BASE if BITS == 4 else 0.0, BLOCK_N)
        # (codes - offset) is exact in dt, so one rounding, that of the scale product (packed
        # bf16x2 / f16x2 arithmetic on sm_90)
        w = (w - off.to(dt)[:, None]) * s.to(dt)[:, None]
        acc = tl.dot(w, tl.trans(xt), acc, input_precision=DOT_PRECISION)      # [BLOCK_N, BLOCK_M]
    _write_out(tl.trans(acc), offs_m, offs_n, mask_m, mask_n, N, out_ptr, stride_om, stride_on, b_ptr, ws_ptr,
               lock_ptr, pid_mn, tl.num_programs(1), HAS_BIAS, SPLIT)


@triton.jit
def _wq_dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K,
                       stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg, stride_on,
                       BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out [N, K] = (q - zero) * scale`` in ``out``'s dtype, computed in fp32 as
    ``dequantize_weight_ref`` does and rounded once; a tile ``[BLOCK_N, BLOCK_K]`` lies within
    one group."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_k < K)[None, :]
    if BITS == 4:
        HALF: tl.constexpr = BLOCK_K // 2
        offs_b = k0 // 2 + tl.arange(0, HALF)
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :] * stride_wk,
                    mask=mask_n[:, None] & (offs_b < K // 2)[None, :], other=0)    # [BLOCK_N, HALF] uint8
        codes = tl.reshape(tl.join(b & 0xF, b >> 4), (BLOCK_N, BLOCK_K)).to(tl.float32)
    else:
        codes = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=mask,
                        other=0).to(tl.float32)
    s, off = _group_params(s_ptr, z_ptr, offs_n, mask_n, k0, stride_sn, stride_sg, stride_zn, stride_zg,
                           GROUP, HAS_ZERO, 8.0 if BITS == 4 else 0.0, BLOCK_N)
    w = (codes - off[:, None]) * s[:, None]
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_triton(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, dtype: torch.dtype,
                      block_n: int = 64, block_k: int = 128, num_warps: int = 4) -> Tensor:
    """The float weight ``[N, K]`` in ``dtype``: ``dequantize_weight_ref(...).to(dtype)`` on the
    device (bit for bit when the scales are in ``dtype`` or fp32). ``block_k`` shrinks to the
    group size when the groups are smaller."""
    N = qweight.shape[0]
    K = qweight.shape[1] * (2 if bits == 4 else 1)
    group = K // scales.shape[1]
    if scales.shape[1] > 1:
        block_k = min(block_k, pow2_divisor(group))
        assert group % block_k == 0, f"BLOCK_K {block_k} must divide the group size {group}"
    out = torch.empty(N, K, device=qweight.device, dtype=dtype)
    z = zeros if zeros is not None else scales  # any pointer: unread when HAS_ZERO is False
    _wq_dequant_kernel[(cdiv(N, block_n), cdiv(K, block_k))](
        qweight, scales, z, out, N, K, qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        z.stride(0), z.stride(1), out.stride(0), BITS=bits, GROUP=group, HAS_ZERO=zeros is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    return out


def _check(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bias: Optional[Tensor],
           bits: int) -> tuple[int, int, int]:
    K = x.shape[-1]
    N = qweight.shape[0]
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"x must be float16/bfloat16/float32, got {x.dtype}"
    if bits == 4:
        assert qweight.dtype == torch.uint8 and qweight.shape[1] * 2 == K, \
            f"int4 qweight must be uint8 [N, K/2] = [{N}, {K // 2}], got {qweight.dtype} {tuple(qweight.shape)}"
    else:
        assert qweight.dtype == torch.int8 and qweight.shape[1] == K, \
            f"int8 qweight must be int8 [N, K] = [{N}, {K}], got {qweight.dtype} {tuple(qweight.shape)}"
    assert scales.dim() == 2 and scales.shape[0] == N and K % scales.shape[1] == 0, \
        f"scales must be [N, K/G] = [{N}, K/G] with G dividing K={K}, got {tuple(scales.shape)}"
    assert zeros is None or zeros.shape == scales.shape, f"zeros {tuple(zeros.shape)} vs scales {tuple(scales.shape)}"
    assert bias is None or bias.shape == (N,), f"bias must be [{N}], got {tuple(bias.shape)}"
    group = K // scales.shape[1]
    assert scales.shape[1] == 1 or group % 16 == 0, f"group size {group} must be a multiple of 16 (or one group per row)"
    for t in (qweight, scales, zeros, bias):
        assert t is None or t.device == x.device, f"all operands on {x.device}, got one on {t.device}"
    return N, K, group


def bf16_pairs(x2: Tensor) -> bool:
    """Whether the rows of bf16 ``x2`` can be read as 32-bit pairs of columns."""
    return x2.dtype == torch.bfloat16 and x2.stride(1) == 1 and x2.stride(0) % 2 == 0 and x2.data_ptr() % 4 == 0


def words_ok(x2: Tensor, qweight: Tensor, bits: int) -> bool:
    """Whether the ``words`` form can read these operands: int4 weights whose rows are whole
    32-bit words (K a multiple of 8, 4-byte aligned) and bf16 activations in 32-bit pairs."""
    return (bits == 4 and bf16_pairs(x2) and qweight.stride(1) == 1 and qweight.stride(0) % 4 == 0
            and qweight.data_ptr() % 4 == 0 and x2.shape[1] % 8 == 0)


def wq_linear_triton(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bias: Optional[Tensor],
                     bits: int, config: Optional[LinearConfig] = None) -> Tensor:
    """``x [..., K]`` @ dequantized ``qweight`` (int4 uint8 ``[N, K/2]`` or int8 ``[N, K]``; scales and
    zeros ``[N, K/G]``, any strides) -> ``[..., N]`` in ``x.dtype``: ``quantized_linear_ref`` fused."""
    N, K, group = _check(x, qweight, scales, zeros, bias, bits)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    cfg = config or pick_config(M, N, K, group, bits, x.device)
    assert cfg.form in FORMS, f"form must be one of {FORMS}, got {cfg.form!r}"
    if cfg.form == "words" and not words_ok(x2, qweight, bits):
        cfg = cfg._replace(form="stream")  # NOTE: the same tiles, read a byte at a time
    assert cfg.form != "swap" or (cfg.block_m >= 16 and cfg.block_k >= 16), \
        f"the swap form needs block_m and block_k >= 16 (tl.dot), got {cfg.block_m}, {cfg.block_k}"
    # NOTE: the interpreter takes a dot of any K; the GPU compiler wants K >= 16, per nibble plane
    assert cfg.form != "planes" or cfg.block_m < 16 or cfg.block_k // (2 if bits == 4 else 1) >= 16, \
        f"the planes form's tensor-core tiles need block_k >= {32 if bits == 4 else 16}, got {cfg.block_k}"
    if cfg.form == "dequant":
        w = dequantize_triton(qweight, scales, zeros, bits, x.dtype, cfg.block_n, cfg.block_k, cfg.num_warps)
        return F.linear(x2, w, None if bias is None else bias.to(x.dtype)).reshape(*x.shape[:-1], N)
    per_channel = scales.shape[1] == 1
    if not per_channel:
        assert group % cfg.block_k == 0, f"BLOCK_K {cfg.block_k} must divide the group size {group}"
    k_per_split = cdiv(cdiv(K, cfg.block_k), cfg.split_k) * cfg.block_k
    if per_channel and zeros is not None and cfg.form == "planes":
        k_per_split = K  # NOTE: the per-channel zero correction needs the whole row's sum in one program
    split = cdiv(K, k_per_split)
    out = x.new_empty(M, N)
    if not M:
        return out.reshape(*x.shape[:-1], N)
    tiles = cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n)
    ws, locks = split_workspace(x.device, M * N, tiles) if split > 1 else (out, out)
    z = zeros if zeros is not None else scales  # any pointer: unread when HAS_ZERO is False
    args = (x2, qweight, scales, z, bias if bias is not None else scales, out, ws, locks, M, N, K, k_per_split,
            x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
            z.stride(0), z.stride(1), out.stride(0), out.stride(1))
    meta = dict(GROUP=group, HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, SPLIT=split > 1,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    stream_grid = (cdiv(N, cfg.block_n), split, cdiv(M, cfg.block_m))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    if cfg.form == "words":
        _w4_gemv_words_kernel[stream_grid](*args, **meta)
    elif cfg.form == "stream":
        _wq_gemv_stream_kernel[stream_grid](*args, BITS=bits, X_PAIRS=bits == 4 and bf16_pairs(x2),
                                            PER_CHANNEL=per_channel, **meta)
    elif cfg.form == "swap":
        magic, base = _EXP_BITS16.get(x.dtype, (0, 0.0)) if bits == 4 else (0, 0.0)
        _wq_dot_swap_kernel[(tiles, split)](*args, BITS=bits, EXP_MAGIC=magic, EXP_BASE=base, EVEN_K=K % cfg.block_k == 0,
                                            DOT_PRECISION=precision, **meta)
    else:
        _wq_linear_kernel[(tiles, split)](*args, BITS=bits, PER_CHANNEL=per_channel, USE_DOT=cfg.block_m >= 16,
                                          DOT_PRECISION=precision, **meta)
    return out.reshape(*x.shape[:-1], N)


def w4a16_linear_triton(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                        bias: Optional[Tensor]) -> Tensor:
    return wq_linear_triton(x, qweight, scales, zeros, bias, bits=4)


def w8a16_linear_triton(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                        bias: Optional[Tensor]) -> Tensor:
    return wq_linear_triton(x, qweight, scales, zeros, bias, bits=8)


ops.w4a16_linear.register_kernel("cuda")(w4a16_linear_triton)
ops.w8a16_linear.register_kernel("cuda")(w8a16_linear_triton)
