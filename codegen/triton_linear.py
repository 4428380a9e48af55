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

The kernels, by ``LinearConfig.form``:

* ``planes`` (``_wq_linear_kernel`` with ``M <= GEMV_MAX_M``): no tensor cores; the few rows
  multiply the weight tile in registers and reduce along K every tile (a GEMV);
* ``stream`` (``_wq_gemv_stream_kernel``), for the same decode sizes: per-lane fp32 sums across
  the whole K split, one reduction at the end, each weight dequantized once for all rows by its
  bits (no int -> float conversion), its offset taken off per code;
* ``words`` (``_w4_gemv_words_kernel``), the same for int4 weights and bf16 activations, a 32-bit
  word of 8 codes at a time: one AND per code, most of them left in place;
* larger M, ``planes``: ``tl.dot`` on the two nibble planes as integer-valued 16-bit tiles, the
  weights the right operand (``_wq_linear_kernel``);
* larger M, ``swap``: ``out^T = W @ x^T`` (``_wq_dot_swap_kernel``), the dequantized weights the
  left operand, from registers, codes made 16-bit floats by their bits.

``pick_config``'s rules choose ``words``/``stream`` and ``swap``: in sm_90 SASS (compiled without a GPU,
``bench/kernel_sass.py``) their inner loops take 2.7-5.4x fewer issue cycles per weight than
the ``planes`` forms at M = 1 to 128. ``planes`` was the first form measured on a card, where it
was bound by that issue rate; the others are not measured yet.

Decode sizes split K across programs so that the weight stream fills every SM (larger M only
while the tiles alone leave SMs idle). The splits add into an fp32 workspace and the last one to
finish a tile writes it out (``_write_out``): a split call is a single kernel launch.

Tiles come from a table measured on the device (``codegen/tuned/<device>.json``, written by
``bench/gpu_tune.py``) when it holds the shape, else from ``pick_config``'s rules.
"""
import functools
import json
import os
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import ops
from .cuda import cdiv, num_sms

GEMV_MAX_M = 4  # up to this many rows: the GEMV form (no tensor cores)
TUNED_DIR = Path(__file__).parent / "tuned"


@triton.jit
def _write_out(acc, offs_m, offs_n, mask_m, mask_n, N, out_ptr, stride_om, stride_on, b_ptr, ws_ptr, lock_ptr, tile,
               n_split, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """A tile's fp32 sums -> ``out`` in its dtype, bias added. Split over K (``SPLIT``): every
    split adds its sums into the fp32 workspace ``[M, N]`` and counts itself in the tile's lock;
    the last one to arrive writes the tile out and leaves the workspace and the lock at zero for
    the next call. So a split call is one kernel: no zero-filled buffer before it, no cast after."""
    omask = mask_m[:, None] & mask_n[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT:
        ws = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws, acc, mask=omask, sem="relaxed")
        tl.debug_barrier()  # every thread's sums are in before the count goes up (a release)
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if arrived == n_split - 1:
            total = tl.load(ws, mask=omask, other=0.0, cache_modifier=".cg")  # from L2, where the adds landed
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=omask)
            tl.store(ws, tl.zeros_like(total), mask=omask)
            tl.atomic_xchg(lock_ptr + tile, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _tile(M, N, K, k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid ``(M tiles x N tiles, K splits)``: this program's output tile (flat index, row and
    column offsets and masks) and its K range."""
    pid_mn = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid_mn // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_mn % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(1) * k_per_split
    return pid_mn, offs_m, offs_n, offs_m < M, offs_n < N, k_start, tl.minimum(k_start + k_per_split, K)


@triton.jit
def _group_params(s_ptr, z_ptr, offs_n, mask_n, k0, stride_sn, stride_sg, stride_zn, stride_zg,
                  GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, CODE_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scale and code offset of the group holding column ``k0``, per output row, in fp32: the
    offset is the zero point (when there is one) plus ``CODE_OFFSET``, what the codes as read
    carry (8 for offset-binary int4, 128 for int8 made offset binary, 0 for signed codes)."""
    g = k0 // GROUP
    s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_ZERO:
        off = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0).to(tl.float32)
    else:
        off = tl.zeros((BLOCK_N,), dtype=tl.float32)
    return s, off + CODE_OFFSET


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
def _wq_gemv_stream_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,
                           M, N, K, k_per_split,
                           stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                           stride_om, stride_on,
                           BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                           SPLIT: tl.constexpr, X_PAIRS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The decode-size GEMV as a weight stream: each lane keeps fp32 partial sums for the bytes it
    loads, ``[BLOCK_M, BLOCK_N, BLOCK_K / codes per byte]``, across the whole K split, and the sums
    cross lanes once, after the loop. A weight is dequantized once for all ``BLOCK_M`` rows, with
    no int -> float conversion (a quarter of the fp32 rate on recent NVIDIA GPUs): one AND-OR puts
    the code into the mantissa of ``2**23`` (``0x4B000000 | code`` is ``2**23 + code``; the high
    nibble stays 4 bits up, ``2**23 + 16 * code``), and one subtraction (an FMA that also scales the
    high nibble down) takes off ``2**23`` and the code's offset (``8 + zero`` for int4, ``128 +
    zero`` for int8 made offset binary), so no row sums are needed. ``X_PAIRS``: bf16 activations
    load as 32-bit pairs of columns, each half made fp32 by a shift or a mask."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    PACK: tl.constexpr = 8 // BITS                      # codes per byte
    BYTES: tl.constexpr = BLOCK_K // PACK
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BYTES)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # 3-D pointers: rows of x [BLOCK_M, 1, BYTES], weight bytes [1, BLOCK_N, BYTES]
    x_rows = x_ptr + offs_m[:, None, None] * stride_xm
    if X_PAIRS:
        x_pairs = x_ptr.to(tl.pointer_type(tl.int32)) + offs_m[:, None, None] * (stride_xm // 2)
    w_rows = w_ptr + offs_n[None, :, None] * stride_wn
    mask_x = mask_m[:, None, None]
    mask_w = mask_n[None, :, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BYTES), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_b = k0 // PACK + offs_j                                             # byte columns of this tile
        in_k = (offs_b < k_end // PACK)[None, None, :]
        b = tl.load(w_rows + offs_b[None, None, :] * stride_wk, mask=mask_w & in_k, other=0)
        # the codes below are offset binary: int4 + 8, int8 + 128
        s, off = _group_params(s_ptr, z_ptr, offs_n, mask_n, k0, stride_sn, stride_sg, stride_zn, stride_zg,
                               GROUP, HAS_ZERO, 8.0 if BITS == 4 else 128.0, BLOCK_N)
        off = off[None, :, None]
        if BITS == 4:
            # low nibble: 2**23 + code; high nibble left in place: 2**23 + 16 * code, scaled down
            # by 1/16 in the same FMA that takes 2**19 and the offset off
            w_lo = ((b & 0xF).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - (off + 8388608.0)
            w_hi = ((b & 0xF0).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) * 0.0625 - (off + 524288.0)
        else:
            codes = (b.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.int32)  # int8 + 128, in [0, 255]
            w_lo = (codes | 0x4B000000).to(tl.float32, bitcast=True) - (off + 8388608.0)
            w_hi = w_lo
        if BITS == 8:
            xk = tl.load(x_rows + (k0 + offs_j)[None, None, :] * stride_xk, mask=mask_x & in_k, other=0.0)
            part = xk.to(tl.float32) * w_lo
        elif X_PAIRS:
            # bf16 x read as 32-bit pairs (even column low, odd high), each made fp32 by its bits
            pair = tl.load(x_pairs + (k0 // 2 + offs_j)[None, None, :], mask=mask_x & in_k, other=0)
            x_even = (pair << 16).to(tl.float32, bitcast=True)
            x_odd = (pair & -65536).to(tl.float32, bitcast=True)
            part = x_even * w_lo + x_odd * w_hi
        else:
            x_even = tl.load(x_rows + (k0 + 2 * offs_j)[None, None, :] * stride_xk, mask=mask_x & in_k, other=0.0)
            x_odd = tl.load(x_rows + (k0 + 2 * offs_j + 1)[None, None, :] * stride_xk, mask=mask_x & in_k, other=0.0)
            part = x_even.to(tl.float32) * w_lo + x_odd.to(tl.float32) * w_hi
        acc += part * s[None, :, None]
    _write_out(tl.sum(acc, axis=2), offs_m, offs_n, mask_m, mask_n, N, out_ptr, stride_om, stride_on, b_ptr, ws_ptr,
               lock_ptr, pid_m * tl.num_programs(0) + pid_n, tl.num_programs(1), HAS_BIAS, SPLIT)


@triton.jit
def _w4_gemv_words_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,
                          M, N, K, k_per_split,
                          stride_xm, stride_ww, stride_sn, stride_sg, stride_zn, stride_zg, stride_om, stride_on,
                          GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weight stream for int4 weights and bf16 activations, a 32-bit word (8 codes, K order)
    at a time. Each half word is put under the exponent bits of ``2**23`` once (the upper one
    shifted down); then one AND per code keeps those bits and the code, in place (at most 12 bits
    up), which reads as ``2**23 + code * 2**place``, and one FMA scales it down by its place and
    takes off ``2**23`` and its offset. x is read as 32-bit column pairs, one per byte of the word.
    ``stride_ww``: words per row."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    WORDS: tl.constexpr = BLOCK_K // 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, WORDS)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_x = mask_m[:, None, None]
    mask_w = mask_n[None, :, None]
    w_rows = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n[None, :, None] * stride_ww
    x_pairs = x_ptr.to(tl.pointer_type(tl.int32)) + offs_m[:, None, None] * (stride_xm // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        word = k0 // 8 + offs_w
        in_k = (word < k_end // 8)[None, None, :]
        w = tl.load(w_rows + word[None, None, :], mask=mask_w & in_k, other=0)      # [1, BLOCK_N, WORDS]
        # each half word under the exponent bits of 2**23: then one AND per code keeps those bits
        # and the code alone
        w_low = (w & 0xFFFF) | 0x4B000000
        w_up = ((w >> 16) & 0xFFFF) | 0x4B000000
        s, off = _group_params(s_ptr, z_ptr, offs_n, mask_n, k0, stride_sn, stride_sg, stride_zn, stride_zg,
                               GROUP, HAS_ZERO, 8.0, BLOCK_N)  # codes are offset binary: int4 + 8
        off = off[None, :, None]
        part = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
        for j in tl.static_range(4):  # byte j: columns 8 * word + 2j (low nibble) and + 2j + 1 (high)
            if j < 2:
                src = w_low
            else:
                src = w_up
            p_lo = 8 * (j % 2)  # the low nibble's place in src; the high one's is 4 bits up
            f_lo = (src & (0x4B000000 | (0xF << p_lo))).to(tl.float32, bitcast=True)  # 2**23 + code * 2**p_lo
            f_hi = (src & (0x4B000000 | (0xF0 << p_lo))).to(tl.float32, bitcast=True)
            q_lo = f_lo * (1.0 / (1 << p_lo)) - (8388608.0 / (1 << p_lo) + off)
            q_hi = f_hi * (1.0 / (16 << p_lo)) - (8388608.0 / (16 << p_lo) + off)
            pair = tl.load(x_pairs + (4 * word + j)[None, None, :], mask=mask_x & in_k, other=0)
            part += (pair << 16).to(tl.float32, bitcast=True) * q_lo + (pair & -65536).to(tl.float32, bitcast=True) * q_hi
        acc += part * s[None, :, None]
    _write_out(tl.sum(acc, axis=2), offs_m, offs_n, mask_m, mask_n, N, out_ptr, stride_om, stride_on, b_ptr, ws_ptr,
               lock_ptr, pid_m * tl.num_programs(0) + pid_n, tl.num_programs(1), HAS_BIAS, SPLIT)


@triton.jit
def _wq_dot_swap_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,
                        M, N, K, k_per_split,
                        stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                        stride_om, stride_on,
                        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SPLIT: tl.constexpr, EXP_MAGIC: tl.constexpr, EXP_BASE: tl.constexpr,
                        DOT_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The tensor-core form with the operands swapped: ``out^T [BLOCK_N, BLOCK_M] = W [BLOCK_N,
    BLOCK_K] @ x^T``. The weights, dequantized in registers, are the left operand (Hopper's wgmma
    takes its left operand from registers, the right one from shared memory), so they never make
    a round trip through shared memory, and the few rows of x are the right operand. The nibble
    planes are interleaved back into K order (``join`` + ``reshape``), one dot per tile. The
    weights enter the dot as integer-valued codes; the group's scale multiplies the fp32 partial
    product, and the codes' offset (``8 + zero`` for int4, ``zero`` for int8, plus ``EXP_BASE``)
    is one rank-1 correction per tile with x's row sums. ``EXP_MAGIC``: 16-bit activations take
    int4 codes by their bits (``0x4300 | code`` is ``128 + code`` in bf16, ``0x6400 | code`` is
    ``1024 + code`` in fp16) instead of an int -> float conversion."""
    pid_mn, offs_m, offs_n, mask_m, mask_n, k_start, k_end = _tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)          # [BLOCK_M, BLOCK_K]
        if BITS == 4:
            HALF: tl.constexpr = BLOCK_K // 2
            offs_b = k0 // 2 + tl.arange(0, HALF)
            b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :] * stride_wk,
                        mask=mask_n[:, None] & (offs_b < k_end // 2)[None, :], other=0)  # [BLOCK_N, HALF] uint8
            if EXP_MAGIC != 0:
                lo = ((b & 0xF).to(tl.int16) | EXP_MAGIC).to(dt, bitcast=True)
                hi = ((b >> 4).to(tl.int16) | EXP_MAGIC).to(dt, bitcast=True)
            else:
                lo = (b & 0xF).to(dt)
                hi = (b >> 4).to(dt)
            w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))                # columns back in K order
        else:
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                        mask=mask_n[:, None] & mask_k[None, :], other=0).to(dt)  # [BLOCK_N, BLOCK_K]
        part = tl.dot(w, tl.trans(xt), input_precision=DOT_PRECISION)            # [BLOCK_N, BLOCK_M]
        s, off = _group_params(s_ptr, z_ptr, offs_n, mask_n, k0, stride_sn, stride_sg, stride_zn, stride_zg,
                               GROUP, HAS_ZERO, 8.0 + EXP_BASE if BITS == 4 else 0.0, BLOCK_N)
        acc += part * s[:, None]
        if HAS_ZERO or BITS == 4:
            xs = tl.sum(xt.to(tl.float32), axis=1)                                 # [BLOCK_M]
            acc -= (off * s)[:, None] * xs[None, :]
    _write_out(tl.trans(acc), offs_m, offs_n, mask_m, mask_n, N, out_ptr, stride_om, stride_on, b_ptr, ws_ptr,
               lock_ptr, pid_mn, tl.num_programs(1), HAS_BIAS, SPLIT)


FORMS = ("planes", "stream", "words", "swap")
_EXP_BITS16 = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}  # magic bits, value of code 0


class LinearConfig(NamedTuple):
    """Tiles of one call. ``form`` picks the kernel: ``planes`` (``_wq_linear_kernel``: for decode
    sizes a reduction along K per tile, else ``tl.dot`` on the two nibble planes), the weight stream
    for decode sizes (``_wq_gemv_stream_kernel``, one reduction per split), or the swapped
    tensor-core form (``_wq_dot_swap_kernel``, ``block_m >= 16``). Entries of tables written
    before forms existed read as ``planes``."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    form: str = "planes"


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def tuned_table(device_name: str) -> dict:
    """``{(bits, group, N, K): [(M, LinearConfig), ...] sorted by M}`` from
    ``codegen/tuned/<device name>.json`` (spaces as underscores); empty when there is none."""
    path = TUNED_DIR / (device_name.replace(" ", "_") + ".json")
    if not path.is_file():
        return {}
    table: dict = {}
    for e in json.loads(path.read_text())["entries"]:
        key = (e["bits"], e["group"], e["N"], e["K"])
        table.setdefault(key, []).append((e["M"], LinearConfig(**e["config"])))
    return {k: sorted(v) for k, v in table.items()}


def tuned_config(table: dict, M: int, N: int, K: int, group: int, bits: int) -> Optional[LinearConfig]:
    """The entry of ``table`` (as ``tuned_table`` returns) for this shape measured at the M nearest
    to ``M`` in the same form (GEMV or tensor cores), or None."""
    rows = table.get((bits, group, N, K))
    if not rows:
        return None
    same = [(m, c) for m, c in rows if (m <= GEMV_MAX_M) == (M <= GEMV_MAX_M)]
    if not same:
        return None
    cfg = min(same, key=lambda mc: (abs(mc[0] - M), mc[0]))[1]
    if M <= GEMV_MAX_M:
        cfg = cfg._replace(block_m=_pow2_ceil(M))
    return cfg


def _tuned(M: int, N: int, K: int, group: int, bits: int, device: torch.device) -> Optional[LinearConfig]:
    if device.type != "cuda" or os.environ.get("QCOMPILER_TUNED", "1") == "0":
        return None
    return tuned_config(tuned_table(torch.cuda.get_device_name(device)), M, N, K, group, bits)


@functools.lru_cache(maxsize=4096)  # one answer per shape and device: a call pays for a dict lookup only
def pick_config(M: int, N: int, K: int, group: int, bits: int, device: torch.device) -> LinearConfig:
    """Tiles for one call. A measured entry for this device and shape wins (``tuned_table``).
    Otherwise, by rule: decode sizes (``M <= GEMV_MAX_M``) take the weight stream (``words`` for
    int4, which falls back to ``stream`` for activations other than bf16), and split K until
    about four programs run per SM; larger
    M takes the swapped tensor-core form with tiles that grow with M, split only while the tiles
    leave SMs idle. BLOCK_K divides the group size (one scale per tile), and a split covers whole
    groups. The tiles are the ones with the fewest issue cycles per weight and no register
    spills in ``bench/kernel_sass.py``'s sm_90 count."""
    per_channel = group >= K
    tuned = _tuned(M, N, K, group, bits, device)
    if tuned is not None and (per_channel or group % tuned.block_k == 0):
        return tuned
    form = ("words" if bits == 4 else "stream") if M <= GEMV_MAX_M else "swap"
    if M <= 2:
        bm, bn, bk, warps, stages = _pow2_ceil(M), 128, 128 if bits == 4 else 64, 4, 1
    elif M <= GEMV_MAX_M:
        bm, bn, bk, warps, stages = 4, 256, 64, 8, 1
    elif M <= 64:
        bm, bn, bk, warps, stages = max(16, _pow2_ceil(M)), 128, 128, 8, 3
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if bits == 8 and M <= GEMV_MAX_M:
        bk //= 2  # one code per byte: the same 32 bytes per lane
    if not per_channel:
        bk = min(bk, group)
    k_tiles = cdiv(K, bk)
    tiles = cdiv(M, bm) * cdiv(N, bn)
    split = 1
    if M <= 64:
        want = max(1, 4 * num_sms(device) // tiles)
        split = min(_pow2_floor(want), max(1, k_tiles // 4))
    return LinearConfig(bm, bn, bk, split, warps, stages, form)


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
    min_group = 32 if bits == 4 else 16  # tl.dot needs K >= 16 per nibble plane
    assert scales.shape[1] == 1 or group % min_group == 0, \
        f"group size {group} must be a multiple of {min_group} (or one group per row)"
    for t in (qweight, scales, zeros, bias):
        assert t is None or t.device == x.device, f"all operands on {x.device}, got one on {t.device}"
    return N, K, group


_WORKSPACES: dict[torch.device, tuple[Tensor, Tensor]] = {}
_RETIRED: list[tuple[Tensor, Tensor]] = []


def split_workspace(device: torch.device, numel: int, tiles: int) -> tuple[Tensor, Tensor]:
    """The device's split-K workspace: fp32 sums and int32 tile locks, zero between calls (the
    kernel's last split clears what it used), grown when a call needs more. A buffer it outgrows
    is kept alive: CUDA graphs captured earlier still write to it. Growth during a capture makes a
    buffer for that graph alone (zero-filled by the graph itself), leaving the shared one as it is."""
    cur = _WORKSPACES.get(device)
    if cur is not None and cur[0].numel() >= numel and cur[1].numel() >= tiles:
        return cur
    size = (_pow2_ceil(max(numel, cur[0].numel() if cur else 0)), _pow2_ceil(max(tiles, cur[1].numel() if cur else 0)))
    new = (torch.zeros(size[0], device=device, dtype=torch.float32), torch.zeros(size[1], device=device, dtype=torch.int32))
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return new
    if cur is not None:
        _RETIRED.append(cur)
    _WORKSPACES[device] = new
    return new


def words_ok(x2: Tensor, qweight: Tensor, bits: int) -> bool:
    """Whether the ``words`` form can read these operands: int4 weights whose rows are whole
    32-bit words (K a multiple of 8, 4-byte aligned) and bf16 activations in 32-bit pairs."""
    return (bits == 4 and x2.dtype == torch.bfloat16 and x2.stride(1) == 1 and x2.stride(0) % 2 == 0
            and x2.data_ptr() % 4 == 0 and qweight.stride(1) == 1 and qweight.stride(0) % 4 == 0
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
    words = cfg.form == "words"
    if words and not words_ok(x2, qweight, bits):
        words = False
        cfg = cfg._replace(form="stream")  # NOTE: the same tiles, read a byte at a time
    stream = cfg.form == "stream"
    swap = cfg.form == "swap"
    assert not swap or cfg.block_m >= 16, f"the {cfg.form} form needs block_m >= 16 (tl.dot), got {cfg.block_m}"
    per_channel = scales.shape[1] == 1
    if not per_channel:
        assert group % cfg.block_k == 0, f"BLOCK_K {cfg.block_k} must divide the group size {group}"
    k_tiles = cdiv(K, cfg.block_k)
    k_per_split = cdiv(k_tiles, cfg.split_k) * cfg.block_k
    if per_channel and zeros is not None and not (stream or swap or words):
        k_per_split = K  # NOTE: the per-channel zero correction needs the whole row's sum in one program
    split = cdiv(K, k_per_split)
    out = x.new_empty(M, N)
    tiles = cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n)
    ws, locks = split_workspace(x.device, M * N, tiles) if split > 1 and M else (out, out)
    if M and words:
        z = zeros if zeros is not None else scales
        _w4_gemv_words_kernel[(cdiv(N, cfg.block_n), split, cdiv(M, cfg.block_m))](
            x2, qweight, scales, z, bias if bias is not None else scales, out, ws, locks,
            M, N, K, k_per_split,
            x2.stride(0), qweight.stride(0) // 4, scales.stride(0), scales.stride(1), z.stride(0), z.stride(1),
            out.stride(0), out.stride(1),
            GROUP=group, HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, SPLIT=split > 1,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif M and stream:
        z = zeros if zeros is not None else scales  # any pointer: unread when HAS_ZERO is False
        # bf16 int4 rows whose column pairs are 32-bit aligned are read as pairs
        pairs = (bits == 4 and x2.dtype == torch.bfloat16 and x2.stride(1) == 1 and x2.stride(0) % 2 == 0
                 and x2.data_ptr() % 4 == 0)
        grid = (cdiv(N, cfg.block_n), split, cdiv(M, cfg.block_m))
        _wq_gemv_stream_kernel[grid](
            x2, qweight, scales, z, bias if bias is not None else scales, out, ws, locks,
            M, N, K, k_per_split,
            x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
            z.stride(0), z.stride(1), out.stride(0), out.stride(1),
            BITS=bits, GROUP=group, HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, SPLIT=split > 1,
            X_PAIRS=pairs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif M and swap:
        z = zeros if zeros is not None else scales
        magic, base = _EXP_BITS16.get(x.dtype, (0, 0.0)) if bits == 4 else (0, 0.0)
        _wq_dot_swap_kernel[(tiles, split)](
            x2, qweight, scales, z, bias if bias is not None else scales, out, ws, locks,
            M, N, K, k_per_split,
            x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
            z.stride(0), z.stride(1), out.stride(0), out.stride(1),
            BITS=bits, GROUP=group, HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, SPLIT=split > 1,
            EXP_MAGIC=magic, EXP_BASE=base, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif M:
        grid = (cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n), split)
        z = zeros if zeros is not None else scales  # any pointer: unread when HAS_ZERO is False
        _wq_linear_kernel[grid](
            x2, qweight, scales, z, bias if bias is not None else scales, out, ws, locks,
            M, N, K, k_per_split,
            x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
            z.stride(0), z.stride(1), out.stride(0), out.stride(1),
            BITS=bits, GROUP=group, PER_CHANNEL=per_channel, HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None,
            SPLIT=split > 1, USE_DOT=cfg.block_m >= 16, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.reshape(*x.shape[:-1], N)


def w4a16_linear_triton(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                        bias: Optional[Tensor]) -> Tensor:
    return wq_linear_triton(x, qweight, scales, zeros, bias, bits=4)


def w8a16_linear_triton(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor],
                        bias: Optional[Tensor]) -> Tensor:
    return wq_linear_triton(x, qweight, scales, zeros, bias, bits=8)


ops.w4a16_linear.register_kernel("cuda")(w4a16_linear_triton)
ops.w8a16_linear.register_kernel("cuda")(w8a16_linear_triton)
