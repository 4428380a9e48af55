"""The Triton kernels of the paged KV cache ops; ``codegen.triton_attention`` holds their wrappers,
launch configurations and registration. Decode: flash-decoding, one program per (sequence, KV head,
split) with the KV head's query heads as the rows of one ``tl.dot``, splits combined by
``_combine_splits_kernel``. Other steps: a causal flash-attention kernel over query tiles. Keys are
gathered slot by slot through the block tables; softmax statistics and dot products accumulate in
fp32. ``window`` (a sliding window of keys) as in ``codegen.attention``. A quantized cache
(``KV_QUANT`` 1: int8, 2: fp8 e4m3) comes as bytes, rows of ``HEAD_DIM`` codes and a bf16 scale:
codes are widened exactly to the dot's dtype, a key's scale multiplies its scores and a value's
its softmax weights."""
import triton
import triton.language as tl


@triton.jit
def _reshape_and_cache_kernel(Key, Value, KCache, VCache, SlotMapping,
                              stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ct, stride_ch,
                              NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                              BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(SlotMapping + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < NUM_HEADS) & (d[None, :] < HEAD_DIM) & (slot >= 0)  # slot < 0: a padding token
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + h[:, None] * stride_ch + d[None, :]
    k = tl.load(Key + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    tl.store(KCache + dst, k.to(KCache.dtype.element_ty), mask=mask)
    v = tl.load(Value + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(VCache + dst, v.to(VCache.dtype.element_ty), mask=mask)


@triton.jit
def _codes(x, KV_QUANT: tl.constexpr):
    """Cached bytes -> fp32: int8 codes; fp8 e4m3 codes / 256 (sign and magnitude moved into an
    fp16's bits, exact for normal and subnormal codes: ``_row_scale`` carries the 256)."""
    if KV_QUANT == 1:
        return x.to(tl.int8, bitcast=True).to(tl.float32)
    b = x.to(tl.int16)
    h = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    return h.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _row_scale(C, rows, ok, HEAD_DIM: tl.constexpr, KV_QUANT: tl.constexpr):
    """The bf16 scale after each row's codes, as fp32 (0 where ``ok`` is False)."""
    lo = tl.load(C + rows + HEAD_DIM, mask=ok, other=0).to(tl.int32)
    hi = tl.load(C + rows + HEAD_DIM + 1, mask=ok, other=0).to(tl.int32)
    s = ((hi << 24) | (lo << 16)).to(tl.float32, bitcast=True)
    if KV_QUANT == 2:
        s = s * 256.0
    return s


@triton.jit
def _tanh(x):
    t = tl.math.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|), in (0, 1]: no overflow
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _attend_tile(q, acc, l_i, m_i, K, V, bt_row, stride_btb, kv_off, n0, key_start, key_stop, q_pos, window,
                 scale_log2, stride_kb, stride_kt, offs_d,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 MASK_KEYS: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, KV_QUANT: tl.constexpr, softcap_log2, SOFTCAP: tl.constexpr):
    """One tile of BLOCK_N keys starting at token ``n0``, gathered slot by slot through the
    block table, folded into the online softmax of ``q [rows, BLOCK_D]``. MASK_KEYS: only keys in
    ``[key_start, key_stop)``; CAUSAL: only keys at or before each row's ``q_pos``; WINDOWED: only
    keys after ``q_pos - window`` (a row may then see no key of the tile). SOFTCAP: scores capped at
    ``softcap_log2`` (in the exp2 domain, like ``scale_log2``) through tanh."""
    pos = n0 + tl.arange(0, BLOCK_N)  # token positions in the sequence
    if MASK_KEYS:
        key_ok = (pos < key_stop) & (pos >= key_start)
        blk = tl.load(bt_row + (pos // BLOCK_SIZE) * stride_btb, mask=key_ok, other=0)
    else:
        blk = tl.load(bt_row + (pos // BLOCK_SIZE) * stride_btb)
    rows = blk.to(tl.int64) * stride_kb + (pos % BLOCK_SIZE) * stride_kt + kv_off  # [BLOCK_N]
    ptrs = rows[:, None] + offs_d[None, :]
    if MASK_KEYS:
        if HEAD_DIM == BLOCK_D:
            mask = key_ok[:, None]
        else:
            mask = key_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    elif HEAD_DIM == BLOCK_D:
        k = tl.load(K + ptrs, eviction_policy="evict_first")
    else:
        mask = offs_d[None, :] < HEAD_DIM
        k = tl.load(K + ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    if KV_QUANT:
        k_ok = (pos < key_stop) & (pos >= key_start) if MASK_KEYS else pos >= 0
        qk = tl.dot(q, tl.trans(_codes(k, KV_QUANT).to(DOT_DTYPE)), input_precision=DOT_PRECISION)
        qk = qk * (_row_scale(K, rows, k_ok, HEAD_DIM, KV_QUANT) * scale_log2)[None, :]
    else:
        qk = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * scale_log2  # [rows, BLOCK_N]
    if SOFTCAP:
        qk = softcap_log2 * _tanh(qk / softcap_log2)
    if MASK_KEYS:
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (pos[None, :] <= q_pos[:, None])
        if WINDOWED:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if WINDOWED:  # a row that has seen no key yet keeps m = -inf: exponents taken against 0 instead
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:  # every row sees a key in the first tile it walks, so m_new is finite from then on
        m_ref = m_new
    alpha = tl.math.exp2(m_i - m_ref)
    p = tl.math.exp2(qk - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK_KEYS or HEAD_DIM != BLOCK_D:
        v = tl.load(V + ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    else:
        v = tl.load(V + ptrs, eviction_policy="evict_first")
    if KV_QUANT:
        pv = p * _row_scale(V, rows, k_ok, HEAD_DIM, KV_QUANT)[None, :]
        acc = acc * alpha[:, None] + tl.dot(pv.to(DOT_DTYPE), _codes(v, KV_QUANT).to(DOT_DTYPE),
                                            input_precision=DOT_PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _paged_decode_kernel(Q, K, V, Out, PartM, PartL, PartAcc, BlockTables, SeqLens, scale_log2, split_size, window,
                         softcap_log2,
                         stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_ot, stride_oh,
                         stride_bts, stride_btb,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_QUANT: tl.constexpr,
                         SOFTCAP: tl.constexpr):
    """Program (sequence s, KV head, split): the GROUP query heads of that KV head against the
    tokens [split * split_size, (split + 1) * split_size) of s, from ``seq_len - window`` on (no
    window: ``window`` at least the longest sequence). One split writes the output, several write (max, sum, acc) partials for
    ``_combine_splits_kernel``."""
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + s).to(tl.int32)
    start = split * split_size
    stop = tl.maximum(tl.minimum(start + split_size, seq_len), start)
    full_stop = start + (stop - start) // BLOCK_N * BLOCK_N
    key_start = tl.maximum(seq_len - window, 0)
    first = tl.maximum(start, key_start // BLOCK_N * BLOCK_N)  # the tile holding the window's first key

    g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    row_ok = (g[:, None] < GROUP) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + s * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=row_ok, other=0.0)
    q = q.to(DOT_DTYPE)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = BlockTables + s * stride_bts
    kv_off = kvh * stride_kh
    if first < key_start and first < full_stop:  # a full tile the window starts inside
        acc, l_i, m_i = _attend_tile(q, acc, l_i, m_i, K, V, bt_row, stride_btb, kv_off, first, key_start, stop, 0, 0,
                                     scale_log2, stride_kb, stride_kt, offs_d, HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D,
                                     True, False, False, DOT_DTYPE, DOT_PRECISION, KV_QUANT,
                                     softcap_log2, SOFTCAP)
        first += BLOCK_N
    for n0 in range(first, full_stop, BLOCK_N):
        acc, l_i, m_i = _attend_tile(q, acc, l_i, m_i, K, V, bt_row, stride_btb, kv_off, n0, 0, stop, 0, 0,
                                     scale_log2, stride_kb, stride_kt, offs_d, HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D,
                                     False, False, False, DOT_DTYPE, DOT_PRECISION, KV_QUANT,
                                     softcap_log2, SOFTCAP)
    if full_stop < stop:  # the ragged last tile (the window may start inside it too)
        acc, l_i, m_i = _attend_tile(q, acc, l_i, m_i, K, V, bt_row, stride_btb, kv_off, full_stop, key_start, stop,
                                     0, 0, scale_log2, stride_kb, stride_kt, offs_d, HEAD_DIM, BLOCK_SIZE, BLOCK_N,
                                     BLOCK_D, True, False, False, DOT_DTYPE, DOT_PRECISION, KV_QUANT,
                                     softcap_log2, SOFTCAP)

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l_i == 0: an empty sequence, zeros
        o_ptrs = Out + s * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok)
    else:
        part = (s * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split  # [S, Hq, NUM_SPLITS]
        head_ok = g < GROUP
        tl.store(PartM + part, m_i, mask=head_ok)
        tl.store(PartL + part, l_i, mask=head_ok)
        tl.store(PartAcc + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=head_ok[:, None])


@triton.jit
def _combine_splits_kernel(Out, PartM, PartL, PartAcc, SeqLens, split_size, stride_ot, stride_oh,
                           NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """Program (sequence, query head): the softmax-weighted sum of its splits' partials."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(SeqLens + s).to(tl.int32)
    n_active = tl.minimum((seq_len + split_size - 1) // split_size, NUM_SPLITS)
    j = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    ok = j < n_active
    part = (s * tl.num_programs(1) + h) * NUM_SPLITS + j
    m = tl.load(PartM + part, mask=ok, other=float("-inf"))
    l_s = tl.load(PartL + part, mask=ok, other=0.0)
    acc = tl.load(PartAcc + part[:, None] * BLOCK_D + offs_d[None, :], mask=ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # inactive splits weigh 0
    denom = tl.sum(w * l_s, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(Out + s * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit
def _paged_prefill_kernel(Q, K, V, Out, BlockTables, SeqLens, QueryStartLoc, scale_log2, window, softcap_log2,
                          stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_ot, stride_oh,
                          stride_bts, stride_btb,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          WINDOWED: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          KV_QUANT: tl.constexpr, SOFTCAP: tl.constexpr):
    """Program (query tile, sequence s, query head): causal attention of BLOCK_M of s's queries.
    Query i of q_len sits at position n - q_len + i and sees keys 0 ..= that position (WINDOWED:
    the last ``window`` of them)."""
    tile = tl.program_id(0)
    s = tl.program_id(1)
    h = tl.program_id(2)
    q0 = tl.load(QueryStartLoc + s).to(tl.int32)
    q_len = tl.load(QueryStartLoc + s + 1).to(tl.int32) - q0
    if tile * BLOCK_M >= q_len:
        return
    n = tl.load(SeqLens + s).to(tl.int32)
    ctx = n - q_len  # tokens cached before this step's queries

    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (i[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + (q0 + i)[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=row_ok, other=0.0)
    q = q.to(DOT_DTYPE)  # [BLOCK_M, BLOCK_D]
    q_pos = ctx + i

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = BlockTables + s * stride_bts
    kv_off = (h // GROUP) * stride_kh
    lo = ctx + tile * BLOCK_M  # keys before the tile's first query are visible to all its rows
    hi = tl.minimum(n, lo + BLOCK_M)  # keys past its last query are visible to none
    full_stop = lo // BLOCK_N * BLOCK_N
    if WINDOWED:  # from the tile holding the first row's first key on, every tile masked
        for n0 in range(tl.maximum(lo - window + 1, 0) // BLOCK_N * BLOCK_N, hi, BLOCK_N):
            acc, l_i, m_i = _attend_tile(q, acc, l_i, m_i, K, V, bt_row, stride_btb, kv_off, n0, 0, hi, q_pos, window,
                                         scale_log2, stride_kb, stride_kt, offs_d, HEAD_DIM, BLOCK_SIZE, BLOCK_N,
                                         BLOCK_D, True, True, True, DOT_DTYPE, DOT_PRECISION, KV_QUANT,
                                     softcap_log2, SOFTCAP)
    else:
        for n0 in range(0, full_stop, BLOCK_N):
            acc, l_i, m_i = _attend_tile(q, acc, l_i, m_i, K, V, bt_row, stride_btb, kv_off, n0, 0, hi, q_pos, 0,
                                         scale_log2, stride_kb, stride_kt, offs_d, HEAD_DIM, BLOCK_SIZE, BLOCK_N,
                                         BLOCK_D, False, False, False, DOT_DTYPE, DOT_PRECISION, KV_QUANT,
                                     softcap_log2, SOFTCAP)
        for n0 in range(full_stop, hi, BLOCK_N):  # the diagonal
            acc, l_i, m_i = _attend_tile(q, acc, l_i, m_i, K, V, bt_row, stride_btb, kv_off, n0, 0, hi, q_pos, 0,
                                         scale_log2, stride_kb, stride_kt, offs_d, HEAD_DIM, BLOCK_SIZE, BLOCK_N,
                                         BLOCK_D, True, True, False, DOT_DTYPE, DOT_PRECISION, KV_QUANT,
                                     softcap_log2, SOFTCAP)
    if WINDOWED:  # padding rows may have seen no key
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(Out + (q0 + i)[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok)
