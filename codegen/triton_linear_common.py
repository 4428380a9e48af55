"""The pieces every weight-only GEMM kernel (``triton_linear``, ``triton_gemv``) shares: a tile's
place in its grid, a group's scale and code offset, and the split-K epilogue.

Split over K, the programs of one output tile add their fp32 sums into a workspace (owned by
whoever runs the program: ``codegen.workspace``) and count themselves in the tile's lock; the last
one to arrive writes the tile in the output dtype and clears what it used. So the workspace is
zero between calls, and a split call in a held workspace is a single launch (no zero-filled
buffer before it, no cast after it).
"""
import triton
import triton.language as tl


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
