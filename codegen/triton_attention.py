"""The paged KV cache ops on CUDA: wrappers, launch configurations and split plans around the
kernels of ``codegen.triton_attention_kernels``, registered as the CUDA kernels of
``qc::reshape_and_cache`` and ``qc::paged_attention`` when this module is imported.

Layout and contract as in ``codegen.attention`` (its ``reshape_and_cache_impl`` and
``paged_attention_ref`` are the references). Every wrapper decides from shapes alone (no host
sync): they can be captured in CUDA graphs. A decode step (``T == num_seqs``: one query per
sequence) runs flash-decoding: each program takes one sequence, one KV head and one split of its
tokens, with every query head of that KV head as the rows of one ``tl.dot`` (the KV tile is read
once for the whole group), then a small kernel combines the splits. Any other step (prompts,
chunks after cached tokens, mixed batches) runs a causal flash-attention kernel over query tiles.
Softmax statistics and dot products accumulate in fp32; as in ``paged_attention_impl``, operands
are rounded to the narrower of the query and cache dtypes, and the output is in ``query.dtype``."""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import attention
from .cuda import num_sms
from .triton_attention_kernels import (_combine_splits_kernel, _paged_decode_kernel, _paged_prefill_kernel,
                                       _reshape_and_cache_kernel)

LOG2E = 1.4426950408889634
_SPLIT_TARGET_PER_SM = 4  # decode programs wanted per SM before splitting sequences further
_MIN_TILES_PER_SPLIT = 4  # a split walks at least this many KV tiles: the combine is not free
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _pow2(n: int, at_least: int = 16) -> int:
    return max(at_least, triton.next_power_of_2(n))


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_metadata(query: Tensor, kv_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    query_start_loc: Tensor) -> None:
    D = attention.cache_head_dim(kv_cache)
    assert query.dim() == 3 and query.shape[2] == D, f"query must be [T, H, {D}], got {tuple(query.shape)}"
    assert query.shape[1] % kv_cache.shape[4] == 0, \
        f"{query.shape[1]} query heads not a multiple of {kv_cache.shape[4]} KV heads"
    assert query.dtype in _FLOAT_DTYPES and (kv_cache.dtype in _FLOAT_DTYPES or attention.is_quantized(kv_cache)), \
        f"query {query.dtype} must be float16, bfloat16 or float32, kv_cache {kv_cache.dtype} that or int8/fp8"
    S = seq_lens.shape[0]
    assert block_tables.dim() == 2 and block_tables.shape[0] == S, \
        f"block_tables must be [{S}, max_blocks], got {tuple(block_tables.shape)}"
    assert seq_lens.dim() == 1 and query_start_loc.shape == (S + 1,), \
        f"seq_lens [S] and query_start_loc [S + 1], got {tuple(seq_lens.shape)} and {tuple(query_start_loc.shape)}"
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        assert not t.is_floating_point() and not t.is_complex(), f"{name} must be integer, got {t.dtype}"
        assert t.device == query.device, f"{name} on {t.device}, query on {query.device}"
    assert kv_cache.device == query.device, f"kv_cache on {kv_cache.device}, query on {query.device}"
    assert kv_cache.stride(-1) == 1, f"kv_cache head_dim must be contiguous, strides {kv_cache.stride()}"


def reshape_and_cache_triton(kv_cache: Tensor, layer: int, key: Tensor, value: Tensor, slot_mapping: Tensor) -> None:
    """Writes ``key``/``value`` ``[T, H_kv, D]`` into ``kv_cache[layer]`` at ``slot_mapping [T]``
    (cast to the cache dtype, or quantized into rows by ``attention.quantize_kv`` and copied as
    bytes; slots < 0 are skipped). In place, like ``reshape_and_cache_impl``."""
    attention._check_cache(kv_cache, layer, key)
    assert value.shape == key.shape, f"value {tuple(value.shape)} vs key {tuple(key.shape)}"
    assert slot_mapping.shape == key.shape[:1] and not slot_mapping.is_floating_point(), \
        f"slot_mapping must be integer [{key.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
    assert kv_cache.stride(-1) == 1, f"kv_cache head_dim must be contiguous, strides {kv_cache.stride()}"
    for t in (key, value, slot_mapping):
        assert t.device == kv_cache.device, f"inputs on {t.device}, kv_cache on {kv_cache.device}"
    if key.shape[0] == 0:
        return
    if attention.is_quantized(kv_cache):
        key, value = (attention.quantize_kv(t, kv_cache.dtype).view(torch.uint8) for t in (key, value))
        kv_cache = kv_cache.view(torch.uint8)
    T, H, D = key.shape
    key, value, slot_mapping = _last_dim_contiguous(key), _last_dim_contiguous(value), slot_mapping.contiguous()
    k_cache, v_cache = kv_cache[layer, 0], kv_cache[layer, 1]  # [num_blocks, block_size, H_kv, D]
    BLOCK_H, BLOCK_D = _pow2(H, 1), _pow2(D, 1)
    _reshape_and_cache_kernel[(T,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=H, HEAD_DIM=D, BLOCK_SIZE=kv_cache.shape[3], BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D,
        num_warps=4 if BLOCK_H * BLOCK_D >= 2048 else 1)


def _decode_config(head_bytes: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the decode kernel for ``head_bytes`` per token and KV head
    (the padded head_dim times the compute dtype's size): for 16-bit heads of 64 and 128, the
    tiles that ran best on a card (``bench/RESULTS.md``); wider heads take tiles that do not spill."""
    if head_bytes <= 128:
        return 64, 4, 3
    if head_bytes <= 256:
        return 128, 4, 2
    return 32, 4, 2  # fp32 head_dim 128, 16-bit 256: 64-token tiles spill


def _prefill_config(head_bytes: int, mean_q_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel: query tiles no taller than
    the mean query length (a batch of decodes and one prompt wastes little on the decodes)."""
    return min(64, _pow2(mean_q_len)), (64 if head_bytes <= 256 else 32), 4, 2


def decode_split_plan(num_seqs: int, num_kv_heads: int, max_ctx: int, block_n: int, num_sms: int,
                      head_bytes: int = 256, num_splits: Optional[int] = None) -> tuple[int, int]:
    """(num_splits, split_size in tokens, a multiple of ``block_n``) for a decode step whose
    sequences hold at most ``max_ctx`` tokens. Split only when ``num_seqs * num_kv_heads`` programs
    leave SMs short of work (fewer than one per SM at ``head_bytes`` 256, two at 128: smaller
    heads need more programs in flight), then up to ``_SPLIT_TARGET_PER_SM`` programs per SM, never
    below ``_MIN_TILES_PER_SPLIT`` tiles a split. ``num_splits`` forces the count (clamped to the
    tiles)."""
    tiles = max(1, -(-max_ctx // block_n))
    programs = max(1, num_seqs * num_kv_heads)
    if num_splits is None and programs >= num_sms * max(1, 256 // head_bytes):
        num_splits = 1
    elif num_splits is None:
        want = -(-_SPLIT_TARGET_PER_SM * num_sms // programs)
        num_splits = max(1, min(want, tiles // _MIN_TILES_PER_SPLIT))
    split_tiles = -(-tiles // max(1, min(num_splits, tiles)))
    return -(-tiles // split_tiles), split_tiles * block_n


def paged_attention_triton(query: Tensor, kv_cache: Tensor, layer: int, block_tables: Tensor, seq_lens: Tensor,
                           query_start_loc: Tensor, scale: float, window: int = 0, softcap: float = 0.0, *, num_splits: Optional[int] = None,
                           block_n: Optional[int] = None) -> Tensor:
    """Causal attention of a step's packed queries over each sequence's paged KV cache, as
    ``paged_attention_impl`` computes it; no host sync, so CUDA graphs can capture it.

    Args:
        query: ``[T, H, D]``; sequence ``s`` owns rows ``query_start_loc[s]:query_start_loc[s + 1]``.
        kv_cache: ``[num_layers, 2, num_blocks, block_size, H_kv, D]``, the step's keys already written
            (quantized: rows of ``D + 2``, ``codegen.attention``).
        layer: which layer's keys and values.
        block_tables: ``[S, max_blocks]`` block ids of each sequence.
        seq_lens: ``[S]`` tokens of each sequence, this step's included.
        query_start_loc: ``[S + 1]`` offsets of each sequence's query rows.
        scale: softmax scale.
        window: > 0: each query sees only the last ``window`` keys up to its own position.
        softcap: > 0: scores ``s`` become ``softcap * tanh(s / softcap)`` before the softmax.
        num_splits, block_n: override the heuristics (decode splits; KV tile size), for tests and tuning.

    Returns:
        ``[T, H, D]`` in ``query.dtype``. ``T == S`` (read from shapes) means a decode step:
        exactly one query per sequence.
    """
    _check_metadata(query, kv_cache, block_tables, seq_lens, query_start_loc)
    T, Hq, D = query.shape
    S = seq_lens.shape[0]
    bs, Hkv = kv_cache.shape[3], kv_cache.shape[4]
    out = torch.empty_like(query)
    if T == 0 or S == 0:
        return out
    query, seq_lens, query_start_loc = _last_dim_contiguous(query), seq_lens.contiguous(), query_start_loc.contiguous()
    dot_dtype = attention._compute_dtype(query, kv_cache)
    kv_quant = {torch.int8: 1, torch.float8_e4m3fn: 2}.get(kv_cache.dtype, 0)
    if kv_quant:
        kv_cache = kv_cache.view(torch.uint8)
    k_cache, v_cache = kv_cache[layer, 0], kv_cache[layer, 1]  # [num_blocks, block_size, H_kv, D], same strides
    group = Hq // Hkv
    BLOCK_D = _pow2(D)
    common = dict(HEAD_DIM=D, BLOCK_SIZE=bs, BLOCK_D=BLOCK_D, DOT_DTYPE=_TL_DTYPES[dot_dtype],
                  DOT_PRECISION="ieee" if dot_dtype == torch.float32 else "tf32", KV_QUANT=kv_quant,
                  SOFTCAP=softcap > 0)
    strides = (query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               out.stride(0), out.stride(1), block_tables.stride(0), block_tables.stride(1))
    wide = dot_dtype.itemsize * BLOCK_D  # bytes of one token's head
    scale_log2 = scale * LOG2E
    softcap_log2 = softcap * LOG2E if softcap > 0 else 1.0
    no_window = 1 << 30  # longer than any sequence: every key is in it
    if T == S:  # decode: flash-decoding over split KV
        BLOCK_N, num_warps, num_stages = _decode_config(wide)
        BLOCK_N = block_n or BLOCK_N
        splits, split_size = decode_split_plan(S, Hkv, block_tables.shape[1] * bs, BLOCK_N, num_sms(query.device),
                                               wide, num_splits)
        BLOCK_G = _pow2(group)
        if splits == 1:
            part_m = part_l = part_acc = out  # unused
        else:
            part_m = torch.empty(S, Hq, splits, dtype=torch.float32, device=query.device)
            part_l = torch.empty_like(part_m)
            part_acc = torch.empty(S, Hq, splits, BLOCK_D, dtype=torch.float32, device=query.device)
        _paged_decode_kernel[(S, Hkv, splits)](
            query, k_cache, v_cache, out, part_m, part_l, part_acc, block_tables, seq_lens, scale_log2, split_size,
            window if window > 0 else no_window, softcap_log2, *strides, GROUP=group, NUM_SPLITS=splits,
            BLOCK_G=BLOCK_G, BLOCK_N=BLOCK_N, **common, num_warps=num_warps, num_stages=num_stages)
        if splits > 1:
            _combine_splits_kernel[(S, Hq)](
                out, part_m, part_l, part_acc, seq_lens, split_size, out.stride(0), out.stride(1),
                NUM_SPLITS=splits, BLOCK_SPLITS=_pow2(splits, 1), HEAD_DIM=D, BLOCK_D=BLOCK_D, num_warps=1)
        return out
    # prefill, chunked prefill, mixed
    BLOCK_M, BLOCK_N, num_warps, num_stages = _prefill_config(wide, -(-T // S))
    BLOCK_N = block_n or BLOCK_N
    tiles = -(-T // BLOCK_M)  # enough for one sequence holding every query; the others' extra tiles exit at once
    _paged_prefill_kernel[(tiles, S, Hq)](
        query, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, scale_log2,
        window if window > 0 else no_window, softcap_log2, *strides,
        GROUP=group, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, WINDOWED=window > 0, **common, num_warps=num_warps,
        num_stages=num_stages)
    return out


attention.reshape_and_cache.register_kernel("cuda")(reshape_and_cache_triton)


@attention.paged_attention.register_kernel("cuda")
def _(query, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale, window=0, softcap=0.0):
    return paged_attention_triton(query, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale, window,
                                  softcap)
