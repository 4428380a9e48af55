"""The decode-size weight-only GEMVs (up to ``GEMV_MAX_M`` rows), as weight streams: each lane
keeps fp32 partial sums for the weights it loads across the whole K split, and they cross lanes
once, after the loop; each weight is dequantized once for all rows, by the bits of its code (no
int -> float conversion, a quarter of the fp32 rate on recent NVIDIA GPUs).

* ``_wq_gemv_stream_kernel`` (form ``stream``): int4 or int8, a byte at a time;
* ``_w4_gemv_words_kernel`` (form ``words``): int4 with bf16 activations, a 32-bit word of 8 codes
  at a time, about one integer instruction per weight.

Launched by ``triton_linear.wq_linear_triton`` on the grid ``(N tiles, K splits, M tiles)``.
"""
import triton
import triton.language as tl

from .triton_linear_common import _group_params, _write_out


@triton.jit
def _stream_tile(M, N, K, k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid ``(N tiles, K splits, M tiles)``: this program's output tile (flat index, row and
    column offsets and masks) and its K range."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = tl.program_id(1) * k_per_split
    return (pid_m * tl.num_programs(0) + pid_n, offs_m, offs_n, offs_m < M, offs_n < N, k_start,
            tl.minimum(k_start + k_per_split, K))


@triton.jit
def _wq_gemv_stream_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,
                           M, N, K, k_per_split,
                           stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                           stride_om, stride_on,
                           BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                           SPLIT: tl.constexpr, X_PAIRS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The decode-size GEMV as a weight stream: each lane keeps fp32 partial sums for the bytes it
    loads, ``[BLOCK_M, BLOCK_N, BLOCK_K / codes per byte]``, across the whole K split, and the sums
    cross lanes once, after the loop. A weight is dequantized once for all ``BLOCK_M`` rows, with
    no int -> float conversion (a quarter of the fp32 rate on recent NVIDIA GPUs): one AND-OR puts
    the code into the mantissa of ``2**23`` (``0x4B000000 | code`` is ``2**23 + code``; the high
    nibble stays 4 bits up, ``2**23 + 16 * code``), and one subtraction (an FMA that also scales the
    high nibble down) takes off ``2**23`` and the code's offset (``8 + zero`` for int4, ``128 +
    zero`` for int8 made offset binary), so no row sums are needed. ``X_PAIRS``: bf16 activations
    load as 32-bit pairs of columns, each half made fp32 by a shift or a mask. ``PER_CHANNEL``
    (one scale per row): the sums are scaled once, after the loop, so each weight costs one
    FMA into them (a grouped scale multiplies each byte's partial sum instead)."""
    tile, offs_m, offs_n, mask_m, mask_n, k_start, k_end = _stream_tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    PACK: tl.constexpr = 8 // BITS                      # codes per byte
    BYTES: tl.constexpr = BLOCK_K // PACK
    offs_j = tl.arange(0, BYTES)
    # 3-D pointers: rows of x [BLOCK_M, 1, BYTES], weight bytes [1, BLOCK_N, BYTES]
    x_rows = x_ptr + offs_m[:, None, None] * stride_xm
    if X_PAIRS:
        x_pairs = x_ptr.to(tl.pointer_type(tl.int32)) + offs_m[:, None, None] * (stride_xm // 2)
    w_rows = w_ptr + offs_n[None, :, None] * stride_wn
    mask_x = mask_m[:, None, None]
    mask_w = mask_n[None, :, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BYTES), dtype=tl.float32)
    # the codes below are offset binary: int4 + 8, int8 + 128
    if PER_CHANNEL:  # one group: its scale and offset, once
        s, off = _group_params(s_ptr, z_ptr, offs_n, mask_n, k_start, stride_sn, stride_sg, stride_zn, stride_zg,
                               GROUP, HAS_ZERO, 8.0 if BITS == 4 else 128.0, BLOCK_N)
        off = off[None, :, None]
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_b = k0 // PACK + offs_j                                             # byte columns of this tile
        in_k = (offs_b < k_end // PACK)[None, None, :]
        b = tl.load(w_rows + offs_b[None, None, :] * stride_wk, mask=mask_w & in_k, other=0)
        if not PER_CHANNEL:
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
            x_lo = xk.to(tl.float32)
        elif X_PAIRS:
            # bf16 x read as 32-bit pairs (even column low, odd high), each made fp32 by its bits
            pair = tl.load(x_pairs + (k0 // 2 + offs_j)[None, None, :], mask=mask_x & in_k, other=0)
            x_lo = (pair << 16).to(tl.float32, bitcast=True)
            x_hi = (pair & -65536).to(tl.float32, bitcast=True)
        else:
            x_lo = tl.load(x_rows + (k0 + 2 * offs_j)[None, None, :] * stride_xk, mask=mask_x & in_k,
                           other=0.0).to(tl.float32)
            x_hi = tl.load(x_rows + (k0 + 2 * offs_j + 1)[None, None, :] * stride_xk, mask=mask_x & in_k,
                           other=0.0).to(tl.float32)
        # sums run left to right (``a + b * c`` is one FMA; ``a + (b * c + d * e)`` would be three)
        if PER_CHANNEL:
            acc = acc + x_lo * w_lo
            if BITS == 4:
                acc = acc + x_hi * w_hi
        else:
            part = x_lo * w_lo
            if BITS == 4:
                part = part + x_hi * w_hi
            acc = acc + part * s[None, :, None]
    if PER_CHANNEL:
        acc = acc * s[None, :, None]
    _write_out(tl.sum(acc, axis=2), offs_m, offs_n, mask_m, mask_n, N, out_ptr, stride_om, stride_on, b_ptr, ws_ptr,
               lock_ptr, tile, tl.num_programs(1), HAS_BIAS, SPLIT)


@triton.jit
def _w4_gemv_words_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,
                          M, N, K, k_per_split,
                          stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                          stride_om, stride_on,
                          GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weight stream for int4 weights and bf16 activations, a 32-bit word (8 codes, K order)
    at a time. Each half word is put under the exponent bits of ``2**23`` once (the upper one
    shifted down); then one AND per code keeps those bits and the code, in place (at most 12 bits
    up), which reads as ``2**23 + code * 2**place``, and one FMA scales it down by its place and
    takes off ``2**23`` and its offset. x is read as 32-bit column pairs, one per byte of the word.
    Both are contiguous along K (``stride_xk`` and ``stride_wk`` are 1: ``words_ok``)."""
    tile, offs_m, offs_n, mask_m, mask_n, k_start, k_end = _stream_tile(M, N, K, k_per_split, BLOCK_M, BLOCK_N)
    WORDS: tl.constexpr = BLOCK_K // 8
    offs_w = tl.arange(0, WORDS)
    mask_x = mask_m[:, None, None]
    mask_w = mask_n[None, :, None]
    w_rows = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n[None, :, None] * (stride_wn // 4)
    x_pairs = x_ptr.to(tl.pointer_type(tl.int32)) + offs_m[:, None, None] * (stride_xm // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N, WORDS), dtype=tl.float32)
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
            # one FMA per weight: the sum runs left to right (``part + a * b + c * d`` would add
            # the two products first, a multiply, an FMA and an add); no zero to start from
            # (``0 + x`` is not ``x`` for x = -0, so it would cost an add)
            if j == 0:
                part = (pair << 16).to(tl.float32, bitcast=True) * q_lo
            else:
                part = part + (pair << 16).to(tl.float32, bitcast=True) * q_lo
            part = part + (pair & -65536).to(tl.float32, bitcast=True) * q_hi
        acc += part * s[None, :, None]
    _write_out(tl.sum(acc, axis=2), offs_m, offs_n, mask_m, mask_n, N, out_ptr, stride_om, stride_on, b_ptr, ws_ptr,
               lock_ptr, tile, tl.num_programs(1), HAS_BIAS, SPLIT)
