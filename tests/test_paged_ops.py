"""Paged KV ops against plain attention over contiguous keys: random block tables with holes,
mixed prefill/decode/chunked batches, GQA ratios 1, 3, 8, any block size."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qcompiler.codegen import cpu_native
from qcompiler.codegen.attention import decode_attention, paged_attention_ref, reshape_and_cache_for_compile

qc = torch.ops.qc


def contiguous_attention(q, k, v, scale):
    """q [q_len, Hq, D] are the last q_len of n positions; k, v [n, Hkv, D]: causal, GQA."""
    q_len, Hq, _ = q.shape
    n, Hkv, _ = k.shape
    rep = Hq // Hkv
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    pos = torch.arange(n - q_len, n)[:, None]
    s = s.masked_fill(torch.arange(n)[None, :] > pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.float()).to(q.dtype)


@given(st.data())
def test_paged_attention_equals_contiguous(data):
    Hkv = data.draw(st.sampled_from([1, 2]))
    rep = data.draw(st.sampled_from([1, 3, 8]))
    D, bs = data.draw(st.sampled_from([8, 16])), data.draw(st.sampled_from([1, 4, 16]))
    S = data.draw(st.integers(1, 4))
    seq_lens = [data.draw(st.integers(1, 40)) for _ in range(S)]
    if data.draw(st.booleans(), label="decode step"):  # one query per sequence: the batched decode path
        q_lens = [1] * S
    else:  # 1: decode, n: prefill, else chunk
        q_lens = [data.draw(st.integers(1, n)) for n in seq_lens]
    max_blocks = max(-(-n // bs) for n in seq_lens) + 1
    num_blocks = S * max_blocks + 3
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    perm = torch.randperm(num_blocks, generator=g)  # scattered blocks, some never used (holes)
    block_tables = perm[: S * max_blocks].view(S, max_blocks)
    kv_cache = torch.randn(2, 2, num_blocks, bs, Hkv, D, generator=g)
    layer = data.draw(st.integers(0, 1))
    ks = [torch.randn(n, Hkv, D, generator=g) for n in seq_lens]
    vs = [torch.randn(n, Hkv, D, generator=g) for n in seq_lens]
    for s, n in enumerate(seq_lens):  # the step writes its own tokens; older ones are already cached
        slots = torch.tensor([int(block_tables[s, p // bs]) * bs + p % bs for p in range(n)])
        qc.reshape_and_cache(kv_cache, layer, ks[s], vs[s], slots)
    q = torch.randn(sum(q_lens), Hkv * rep, D, generator=g)
    qsl = torch.tensor([0] + q_lens).cumsum(0)
    scale = D ** -0.5
    out = qc.paged_attention(q, kv_cache, layer, block_tables, torch.tensor(seq_lens), qsl, scale)
    ref = paged_attention_ref(q, kv_cache, layer, block_tables, torch.tensor(seq_lens), qsl, scale)
    for s in range(S):
        rows = slice(int(qsl[s]), int(qsl[s + 1]))
        expect = contiguous_attention(q[rows], ks[s], vs[s], scale)
        torch.testing.assert_close(out[rows], expect, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref[rows], expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rep", [1, 3])
def test_sync_free_decode_attention_equals_reference(rep):
    """The decode attention a compiled program traces (keys up to the block table's width, masked
    past each length) against the reference: holes, GQA, lengths far apart, random keys in the
    slots no sequence owns (a mask that lets one through changes the result)."""
    g = torch.Generator().manual_seed(rep)
    Hkv, D, bs = 2, 8, 4
    seq_lens = torch.tensor([1, 13, 6])
    block_tables = torch.randperm(16, generator=g)[:12].view(3, 4)  # width 4 blocks: 16 slots > 13
    kv_cache = torch.randn(2, 2, 16, bs, Hkv, D, generator=g)
    q = torch.randn(3, Hkv * rep, D, generator=g)
    args = (q, kv_cache, 1, block_tables, seq_lens)
    out = decode_attention(*args, 0.3)
    ref = paged_attention_ref(*args, torch.arange(4), 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_reshape_and_cache_exact_slots_and_padding():
    kv = torch.zeros(1, 2, 3, 2, 1, 1)
    k = torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    qc.reshape_and_cache(kv, 0, k, -k, torch.tensor([5, -1, 0]))  # -1: a padding token, skipped
    assert kv[0, 0].flatten().tolist() == [3.0, 0, 0, 0, 0, 1.0]  # token 0 -> slot 5, token 2 -> slot 0
    assert kv[0, 1].flatten().tolist() == [-3.0, 0, 0, 0, 0, -1.0]


def test_compiled_kv_write_lands_in_the_callers_cache():
    """The KV write a compiled CPU program traces: compiled by Inductor, it writes exactly the
    op's slots of the given layer into the cache the caller passed (bf16 cache, fp32 keys)."""
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(3, 2, 5, 4, 2, 8, generator=g).to(torch.bfloat16)
    expect = kv.clone()
    write = torch.compile(reshape_and_cache_for_compile, dynamic=True)
    for layer, slots in ((1, [7, 0, 19]), (2, [4]), (1, [12, 13])):
        k, v = (torch.randn(len(slots), 2, 8, generator=g) for _ in range(2))
        write(kv, layer, k, v, torch.tensor(slots))
        qc.reshape_and_cache(expect, layer, k, v, torch.tensor(slots))
        assert torch.equal(kv, expect), (layer, slots)


def test_opcheck():
    kv = torch.randn(1, 2, 4, 4, 2, 8)
    torch.library.opcheck(qc.reshape_and_cache, (kv, 0, torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.tensor([0, 5, 9])))
    torch.library.opcheck(qc.paged_attention, (torch.randn(3, 4, 8), kv, 0, torch.tensor([[0, 1], [2, 3]]),
                                               torch.tensor([5, 2]), torch.tensor([0, 2, 3]), 0.35))
    torch.library.opcheck(qc.paged_attention, (torch.randn(2, 4, 8), kv, 0, torch.tensor([[0, 1], [2, 3]]),
                                               torch.tensor([7, 2]), torch.tensor([0, 1, 2]), 0.35))


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [5, 1, 3]], ids=["decode", "mixed"])
def test_fp32_queries_over_a_bf16_cache(q_lens):
    """fp32 queries over a bf16 cache (attention then runs in bf16): fp32 output, equal to fp32
    attention over the bf16-rounded operands up to bf16 arithmetic."""
    g = torch.Generator().manual_seed(0)
    Hkv, rep, D, bs, seq_lens = 2, 3, 16, 4, [9, 14, 6]
    block_tables = torch.randperm(16, generator=g)[:12].view(3, 4)
    kv = torch.zeros(1, 2, 16, bs, Hkv, D, dtype=torch.bfloat16)
    ks = [torch.randn(n, Hkv, D, generator=g) for n in seq_lens]
    vs = [torch.randn(n, Hkv, D, generator=g) for n in seq_lens]
    for s, n in enumerate(seq_lens):
        slots = torch.tensor([int(block_tables[s, p // bs]) * bs + p % bs for p in range(n)])
        qc.reshape_and_cache(kv, 0, ks[s], vs[s], slots)
    q = torch.randn(sum(q_lens), Hkv * rep, D, generator=g)
    qsl = torch.tensor([0] + q_lens).cumsum(0)
    out = qc.paged_attention(q, kv, 0, block_tables, torch.tensor(seq_lens), qsl, D ** -0.5)
    assert out.dtype == torch.float32
    r = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    for s in range(3):
        rows = slice(int(qsl[s]), int(qsl[s + 1]))
        expect = contiguous_attention(r(q[rows]), r(ks[s]), r(vs[s]), D ** -0.5)
        torch.testing.assert_close(out[rows], expect, rtol=0, atol=3e-2)


native = pytest.mark.skipif(not cpu_native.available(), reason="our CPU kernels need AVX-512 and g++")
F32, BF16 = torch.float32, torch.bfloat16


@native
@pytest.mark.parametrize("D,rep,bs", [(64, 1, 16), (64, 3, 4), (64, 8, 16), (128, 3, 16), (32, 5, 8), (16, 1, 4)])
@pytest.mark.parametrize("q_dt,kv_dt", [(F32, F32), (F32, BF16), (BF16, BF16)])
def test_native_decode_equals_reference(D, rep, bs, q_dt, kv_dt):
    """``qc_cpu::paged_decode`` (K/V read in place through the block tables) against the reference:
    holes in the block tables, random keys in every slot no sequence owns, lengths 1 to past a
    block, GQA with query heads in chunks of up to 4 per KV head, fp32/bf16 query and cache (fp32
    arithmetic; a bf16 output is the fp32 result rounded). ``decode_attention`` dispatches to it."""
    g = torch.Generator().manual_seed(D + rep)
    Hkv, seq_lens = 2, torch.tensor([1, bs, bs + 1, 45])
    nb = -(-45 // bs)
    tables = torch.randperm(4 * nb + 3, generator=g)[: 4 * nb].view(4, nb)
    kv = torch.randn(2, 2, 4 * nb + 3, bs, Hkv, D, generator=g).to(kv_dt)
    q = torch.randn(4, Hkv * rep, D, generator=g).to(q_dt)
    out = torch.ops.qc_cpu.paged_decode(q, kv, 1, tables, seq_lens, 0.3)
    ref = paged_attention_ref(q.float(), kv.float(), 1, tables, seq_lens, torch.arange(5), 0.3)
    assert out.dtype == q_dt and out.shape == q.shape
    tol = dict(rtol=1e-5, atol=1e-5) if q_dt == F32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    assert torch.equal(decode_attention(q, kv, 1, tables, seq_lens, 0.3), out)


@native
def test_native_decode_refuses_bad_input():
    kv = torch.randn(1, 2, 4, 4, 2, 16)
    q, tables = torch.randn(2, 4, 16), torch.tensor([[0, 1], [2, 3]])
    decode = torch.ops.qc_cpu.paged_decode
    with pytest.raises(RuntimeError, match="length 0"):
        decode(q, kv, 0, tables, torch.tensor([3, 0]), 0.25)
    with pytest.raises(RuntimeError, match="length 9"):
        decode(q, kv, 0, tables, torch.tensor([3, 9]), 0.25)  # past its 2 blocks of 4
    with pytest.raises(RuntimeError, match="outside the cache"):
        decode(q, kv, 0, torch.tensor([[0, 7], [2, 3]]), torch.tensor([6, 2]), 0.25)
    with pytest.raises(RuntimeError, match="layer 1 outside"):
        decode(q, kv, 1, tables, torch.tensor([3, 2]), 0.25)
    with pytest.raises(RuntimeError, match="head_dim 8 not built"):
        decode(torch.randn(2, 4, 8), torch.randn(1, 2, 4, 4, 2, 8), 0, tables, torch.tensor([3, 2]), 0.25)
    with pytest.raises(RuntimeError, match="query heads 3"):
        decode(torch.randn(2, 3, 16), kv, 0, tables, torch.tensor([3, 2]), 0.25)
    torch.library.opcheck(decode.default, (q, kv, 0, tables, torch.tensor([3, 2]), 0.25))


@native
@pytest.mark.parametrize("q_lens", [[1, 1, 1, 1], [1, 3, 1, 1], [2, 1, 1]])
@pytest.mark.parametrize("q_dt,kv_dt,D,window", [(F32, F32, 64, 0), (BF16, BF16, 64, 5), (F32, torch.int8, 32, 0),
                                                 (F32, F32, 8, 0)])
def test_native_paged_attention_is_the_op(q_lens, q_dt, kv_dt, D, window):
    """``qc_cpu::paged_attention``, what a compiled CPU program calls: ``qc::paged_attention``'s
    results exactly, decode steps from ``paged_decode`` and every other step (a prompt chunk, a
    sequence with two queries among decodes, a head size not built) from the op itself."""
    from qcompiler.codegen.attention import new_kv_cache, quantize_kv
    g = torch.Generator().manual_seed(D + len(q_lens) + window)
    S, bs, Hkv = len(q_lens), 4, 2
    seq_lens = torch.tensor([9, 4, 17, 2][:S])
    tables = torch.randperm(6 * S, generator=g).view(S, 6)
    kv = new_kv_cache(2, 6 * S, bs, Hkv, D, kv_dt)
    x = torch.randn(2, 2, 6 * S, bs, Hkv, D, generator=g)
    kv.copy_(quantize_kv(x, kv_dt) if kv_dt == torch.int8 else x.to(kv_dt))
    q = torch.randn(sum(q_lens), 3 * Hkv, D, generator=g).to(q_dt)
    starts = torch.tensor([0, *q_lens]).cumsum(0)
    args = (q, kv, 1, tables, seq_lens, starts, D ** -0.5, window)
    out = torch.ops.qc_cpu.paged_attention(*args)
    assert torch.equal(out, qc.paged_attention(*args))
    torch.testing.assert_close(out.float(), paged_attention_ref(q.float(), kv, 1, tables, seq_lens, starts, D ** -0.5,
                                                                window), rtol=2e-2, atol=2e-2)
    torch.library.opcheck(torch.ops.qc_cpu.paged_attention.default, args)
