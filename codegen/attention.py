"""Paged KV cache ops: ``qc::reshape_and_cache`` (write a step's keys and values into their
slots) and ``qc::paged_attention`` (causal attention of a step's queries over each sequence's
blocks: prefill, decode and chunked prefill are one op). ``window > 0``: a sliding window, the
query at position ``p`` sees the keys at ``p - window < j <= p`` (transformers' ``sliding_window``).
``softcap > 0``: each score ``s = scale * q . k`` becomes ``softcap * tanh(s / softcap)`` before the
softmax (Gemma 2's ``attn_logit_softcapping``).

KV cache layout: ``kv_cache [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``;
token ``p`` of a sequence lives in slot ``block_tables[s, p // block_size] * block_size +
p % block_size``. A step's tokens are packed: sequence ``s`` owns query rows
``query_start_loc[s]:query_start_loc[s + 1]``, which are its last tokens: ``seq_lens[s]``
counts every token of ``s`` including them. Heads are grouped (GQA): query head ``h``
reads KV head ``h // (num_heads // num_kv_heads)``.

A quantized cache (dtype int8 or float8_e4m3fn) stores each token's head vector as one row of
``D + 2`` bytes, ``kv_cache [L, 2, blocks, block_size, H_kv, D + 2]``: ``D`` codes, then the row's
scale as bfloat16 (little endian), ``x ~= code * scale``. int8: codes in ``[-127, 127]``, scale
``absmax / 127``; fp8 (e4m3): codes ``x / scale`` rounded to e4m3, scale ``absmax / 448``. The
scales live in the rows, so a block copied, forked, evicted or recomputed carries its own."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_native


QUANT_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}  # quantized cache dtypes: largest code
SCALE_BYTES = 2  # a quantized row's bf16 scale


def is_quantized(kv_cache: Tensor) -> bool:
    return kv_cache.dtype in QUANT_MAX


def row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements in one cached head vector: ``head_dim``, plus the scale's bytes when quantized."""
    return head_dim + (SCALE_BYTES if dtype in QUANT_MAX else 0)


def cache_head_dim(kv_cache: Tensor) -> int:
    return kv_cache.shape[-1] - (SCALE_BYTES if is_quantized(kv_cache) else 0)


def new_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device=None) -> Tensor:
    return torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, row_width(head_dim, dtype), dtype=dtype,
                       device=device)


def quantize_kv(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x [..., D]`` -> rows ``[..., D + 2]`` of ``dtype`` (the layout above): the scale is rounded
    to bf16 first and the codes are taken against the rounded scale."""
    qmax = QUANT_MAX[dtype]
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / qmax).clamp_min(2.0 ** -100).to(torch.bfloat16)
    # the rounded scale back through its bits: compiled code may skip a bf16 -> fp32 round trip
    rounded = (scale.view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    y = (xf / rounded).clamp(-qmax, qmax)
    codes = y.round().to(torch.int8) if dtype == torch.int8 else y.to(dtype)
    return torch.cat([codes.view(torch.uint8), scale.view(torch.uint8)], -1).view(dtype)


def dequantize_kv(rows: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Quantized rows ``[..., D + 2]`` -> ``[..., D]`` in ``dtype`` (code times scale, in fp32)."""
    D = rows.shape[-1] - SCALE_BYTES
    scale = rows[..., D:].view(torch.bfloat16).float()
    return (rows[..., :D].float() * scale).to(dtype)


def _plain(kv_cache: Tensor) -> Tensor:
    """The cache as the dtype its copies and gathers run in (bytes for a quantized cache: not
    every op takes fp8)."""
    return kv_cache.view(torch.uint8) if is_quantized(kv_cache) else kv_cache


def _to_cache(x: Tensor, kv_cache: Tensor) -> Tensor:
    return quantize_kv(x, kv_cache.dtype).view(torch.uint8) if is_quantized(kv_cache) else x.to(kv_cache.dtype)


def _from_cache(x: Tensor, cache_dtype: torch.dtype, dtype: torch.dtype) -> Tensor:
    return dequantize_kv(x.view(cache_dtype), dtype) if cache_dtype in QUANT_MAX else x.to(dtype)


def _check_cache(kv_cache: Tensor, layer: int, key: Tensor) -> None:
    assert kv_cache.dim() == 6 and kv_cache.shape[1] == 2, f"kv_cache must be [L, 2, blocks, block, H_kv, D], got {tuple(kv_cache.shape)}"
    assert 0 <= layer < kv_cache.shape[0], f"layer {layer} outside {kv_cache.shape[0]} layers"
    assert key.shape[1:] == (kv_cache.shape[4], cache_head_dim(kv_cache)), \
        f"key [T, H_kv, D] {tuple(key.shape)} vs cache heads {tuple(kv_cache.shape[4:])}"


def reshape_and_cache_impl(kv_cache: Tensor, layer: int, key: Tensor, value: Tensor, slot_mapping: Tensor) -> None:
    """``key``/``value`` ``[T, H_kv, D]`` into ``kv_cache[layer]`` at ``slot_mapping[T]``; slots < 0 are skipped."""
    _check_cache(kv_cache, layer, key)
    if slot_mapping.numel() and bool(slot_mapping.min() < 0):  # padding rows: rare, pay for the mask then
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    H, W = kv_cache.shape[4:]
    cache = _plain(kv_cache)
    cache[layer, 0].view(-1, H, W).index_copy_(0, slot_mapping, _to_cache(key, kv_cache))
    cache[layer, 1].view(-1, H, W).index_copy_(0, slot_mapping, _to_cache(value, kv_cache))


reshape_and_cache = torch.library.custom_op("qc::reshape_and_cache", reshape_and_cache_impl, mutates_args=("kv_cache",))


@reshape_and_cache.register_fake
def _(kv_cache, layer, key, value, slot_mapping):
    return None


def reshape_and_cache_for_compile(kv_cache: Tensor, layer: int, key: Tensor, value: Tensor,
                                  slot_mapping: Tensor) -> None:
    """What a CPU program under ``torch.compile`` calls for ``qc::reshape_and_cache``: one
    ``index_put_`` on the whole cache per K and V, which Inductor performs in place on the cache
    input (an ``index_copy_`` into a view of it made Inductor copy the whole cache on each call).
    Every slot must be >= 0: CPU steps have no padding rows (only CUDA graphs pad, and they run
    the Triton kernel)."""
    bs = kv_cache.shape[3]
    block, offset = slot_mapping // bs, slot_mapping % bs
    at_layer = torch.full_like(block, layer)
    cache = _plain(kv_cache)
    cache.index_put_((at_layer, torch.zeros_like(block), block, offset), _to_cache(key, kv_cache))
    cache.index_put_((at_layer, torch.ones_like(block), block, offset), _to_cache(value, kv_cache))


def gather_kv(kv_cache: Tensor, layer: int, block_table: Tensor, seq_len: int,
              dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """One sequence's keys and values ``[seq_len, H_kv, D]`` in token order, in ``dtype`` (default:
    the cache's, fp32 for a quantized cache)."""
    bs = kv_cache.shape[3]
    blocks = block_table[: -(-seq_len // bs)]
    dtype = dtype or (torch.float32 if is_quantized(kv_cache) else kv_cache.dtype)
    cache = _plain(kv_cache)
    k = cache[layer, 0].index_select(0, blocks).flatten(0, 1)[:seq_len]
    v = cache[layer, 1].index_select(0, blocks).flatten(0, 1)[:seq_len]
    return _from_cache(k, kv_cache.dtype, dtype), _from_cache(v, kv_cache.dtype, dtype)


def _compute_dtype(query: Tensor, kv_cache: Tensor) -> torch.dtype:
    """Attention runs in the narrower of the two (a 16-bit cache is not widened for fp32 queries),
    except bf16 on a CPU without bf16 hardware: fp32 there (emulated bf16 is slower). A quantized
    cache is read into the query's dtype."""
    if is_quantized(kv_cache):
        return query.dtype
    emulated = kv_cache.dtype == torch.bfloat16 and query.device.type == "cpu" and not cpu_native.BF16_NATIVE
    return kv_cache.dtype if kv_cache.dtype.itemsize < query.dtype.itemsize and not emulated else query.dtype


def paged_attention_ref(query: Tensor, kv_cache: Tensor, layer: int, block_tables: Tensor, seq_lens: Tensor,
                        query_start_loc: Tensor, scale: float, window: int = 0, softcap: float = 0.0) -> Tensor:
    """Readable reference: per sequence, per query, softmax over the keys at or before it (fp32),
    the last ``window`` of them when ``window > 0``, scores soft-capped when ``softcap > 0``."""
    T, Hq, D = query.shape
    Hkv = kv_cache.shape[4]
    out = torch.empty_like(query)
    for s in range(seq_lens.shape[0]):
        q0, q1, n = int(query_start_loc[s]), int(query_start_loc[s + 1]), int(seq_lens[s])
        k, v = gather_kv(kv_cache, layer, block_tables[s], n, torch.float32)
        for i in range(q0, q1):
            pos = n - (q1 - q0) + (i - q0)  # absolute position of this query
            lo = max(0, pos + 1 - window) if window > 0 else 0
            for h in range(Hq):
                kh = k[lo: pos + 1, h // (Hq // Hkv)].float()
                vh = v[lo: pos + 1, h // (Hq // Hkv)].float()
                scores = kh @ query[i, h].float() * scale
                if softcap > 0:
                    scores = softcap * torch.tanh(scores / softcap)
                p = torch.softmax(scores, dim=0)
                out[i, h] = (p @ vh).to(query.dtype)
    return out


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float,
               softcap: float, enable_gqa: bool = False) -> Tensor:
    """SDPA, or with ``softcap > 0`` its explicit form with capped scores (softmax in fp32).
    ``mask``: boolean, True where a key is seen."""
    if softcap <= 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=enable_gqa)
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = softcap * torch.tanh(s / softcap)
    if causal:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(s.shape[-1] - s.shape[-2])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ v.float()).to(q.dtype)


def decode_attention(query: Tensor, kv_cache: Tensor, layer: int, block_tables: Tensor, seq_lens: Tensor,
                     scale: float, lens: Optional[list[int]] = None, window: int = 0, softcap: float = 0.0) -> Tensor:
    """One query per sequence. On a CPU with our kernels (fp32 or bf16 query and cache):
    ``qc_cpu::paged_decode`` reads K and V in place through the block tables, in fp32. Otherwise
    every sequence's blocks are gathered at once (``index_select``), one
    SDPA for the step, keys past a sequence's length masked. With ``lens`` (the lengths, on the
    host) keys stop at the longest and equal lengths need no mask; without, keys span the block
    table's width and are always masked: no host sync, so Dynamo can trace it and Inductor
    schedules it with its neighbours. ``window > 0``: only each sequence's last ``window`` keys;
    ``softcap > 0``: capped scores."""
    if cpu_native.decode_supported(query, kv_cache):  # in place from the paged cache, no gather
        return torch.ops.qc_cpu.paged_decode(query.contiguous(), kv_cache, layer, block_tables.contiguous(),
                                             seq_lens.contiguous(), scale, window, softcap)
    S, Hq, D = query.shape
    bs, Hkv = kv_cache.shape[3], kv_cache.shape[4]
    if lens is None:
        nb = block_tables.shape[1]
        L, masked = nb * bs, True
    else:
        L = max(lens)
        nb, masked = -(-L // bs), min(lens) != L or (window > 0 and L > window)
    idx = block_tables[:, :nb].reshape(-1)
    dt = _compute_dtype(query, kv_cache)
    W, cache = kv_cache.shape[5], _plain(kv_cache)
    k, v = (_from_cache(cache[layer, i].index_select(0, idx).view(S, nb * bs, Hkv, W)[:, :L], kv_cache.dtype, dt)
            .transpose(1, 2) for i in (0, 1))  # [S, H_kv, L, D]
    mask = None
    if masked:
        keys = torch.arange(L, device=query.device)
        mask = keys < seq_lens.unsqueeze(1)
        if window > 0:
            mask = mask & (keys >= seq_lens.unsqueeze(1) - window)
        mask = mask.view(S, 1, 1, L)
    # NOTE: the query heads of one KV head are rows of one attention (query head h reads KV head
    # h // rep): no enable_gqa flag, which Dynamo cannot pass when head counts are symbolic
    q = query.view(S, Hkv, Hq // Hkv, D).to(dt)  # [S, H_kv, rep, D]
    o = _attention(q, k.to(dt), v.to(dt), mask, False, scale, softcap)
    return o.reshape(S, Hq, D).to(query.dtype)


def paged_attention_for_compile(query: Tensor, kv_cache: Tensor, layer: int, block_tables: Tensor,
                                seq_lens: Tensor, query_start_loc: Tensor, scale: float, window: int = 0,
                                softcap: float = 0.0) -> Tensor:
    """What a CPU program under ``torch.compile`` calls for ``qc::paged_attention``: decode steps
    (one query per sequence, a shape fact Dynamo guards on) as traceable ATen ops, other steps
    through the opaque op."""
    if query.shape[0] == seq_lens.shape[0]:
        return decode_attention(query, kv_cache, layer, block_tables, seq_lens, scale, window=window, softcap=softcap)
    return paged_attention(query, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale, window, softcap)


def paged_attention_impl(query: Tensor, kv_cache: Tensor, layer: int, block_tables: Tensor, seq_lens: Tensor,
                         query_start_loc: Tensor, scale: float, window: int = 0, softcap: float = 0.0) -> Tensor:
    """``query [T, H, D]`` -> ``[T, H, D]``: causal attention over each sequence's cached KV
    (the step's own keys must already be written), within the last ``window`` keys when
    ``window > 0``, scores soft-capped when ``softcap > 0``. CPU/any device: a decode step is one batched SDPA; a step with prompt chunks
    runs one SDPA per prompt chunk, its decodes batched through ``qc_cpu::paged_decode`` where that takes them."""
    T, Hq, D = query.shape
    Hkv = kv_cache.shape[4]
    assert Hq % Hkv == 0, f"{Hq} query heads not a multiple of {Hkv} KV heads"
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    if T == len(lens) and starts == list(range(T + 1)):
        return decode_attention(query, kv_cache, layer, block_tables, seq_lens, scale, lens, window, softcap)
    out = torch.empty_like(query)
    dt = _compute_dtype(query, kv_cache)
    native = ([s for s in range(len(lens)) if starts[s + 1] - starts[s] == 1]
              if cpu_native.decode_supported(query, kv_cache) else [])
    if native:  # a mixed step's decodes: one call, in place
        rows, seqs = torch.tensor([starts[s] for s in native]), torch.tensor(native)
        out[rows] = torch.ops.qc_cpu.paged_decode(query[rows].contiguous(), kv_cache, layer, block_tables[seqs].contiguous(),
                                                  seq_lens[seqs].contiguous(), scale, window, softcap)
    done = set(native)
    for s, n in enumerate(lens):
        q0, q1 = starts[s], starts[s + 1]
        if q1 == q0 or s in done:
            continue
        k, v = gather_kv(kv_cache, layer, block_tables[s], n, dt)
        q = query[q0:q1].transpose(0, 1).unsqueeze(0).to(dt)     # [1, Hq, q_len, D]
        k, v = (t.transpose(0, 1).unsqueeze(0).to(dt) for t in (k, v))  # [1, Hkv, n, D]
        q_len = q1 - q0
        # query i sits at position n - q_len + i: it sees keys 0 .. n - q_len + i
        if window > 0 and n > window:  # keys from n - q_len + i - window + 1 on
            ones = torch.ones(q_len, n, dtype=torch.bool, device=query.device)
            mask, causal = ones.tril(n - q_len) & ones.triu(n - q_len - window + 1), False
        elif q_len == 1:  # decode: every cached key
            mask, causal = None, False
        elif q_len == n:  # a whole prompt: plain causal
            mask, causal = None, True
        else:  # a chunk after cached tokens
            mask, causal = torch.ones(q_len, n, dtype=torch.bool, device=query.device).tril(n - q_len), False
        o = _attention(q, k, v, mask, causal, scale, softcap, enable_gqa=Hq != Hkv)
        out[q0:q1] = o[0].transpose(0, 1).to(query.dtype)
    return out


paged_attention = torch.library.custom_op("qc::paged_attention", paged_attention_impl, mutates_args=())


@paged_attention.register_fake
def _(query, kv_cache, layer, block_tables, seq_lens, query_start_loc, scale, window=0, softcap=0.0):
    return torch.empty_like(query)
