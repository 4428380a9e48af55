"""Triton paged-attention kernels against the references of codegen.attention: reshape_and_cache
equal to ``reshape_and_cache_impl`` exactly; paged_attention within float tolerance of
``paged_attention_ref`` over block tables with holes (every slot no sequence wrote holds NaN,
so a read past a sequence's tokens shows), decode (split and unsplit), prompts, chunks after
cached tokens and mixed batches, GQA ratios 1, 3, 8, block sizes 1, 4, 5, 16, caches in fp32, fp16
and quantized (int8, fp8: the kernels read the same rows the reference dequantizes). Without CUDA the
kernels run in the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1);
the bf16, opcheck and CUDA-graph tests need a GPU."""
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcompiler.codegen.attention import is_quantized, paged_attention_ref, reshape_and_cache_impl, row_width
from qcompiler.codegen.triton_attention import (_MIN_TILES_PER_SPLIT, _SPLIT_TARGET_PER_SM, decode_split_plan,
                                               paged_attention_triton, reshape_and_cache_triton)

# NOTE: the Triton 3.6 interpreter takes a loop bound's 1-element array as an index, which NumPy deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
f16, f32, bf16, i8, fp8 = torch.float16, torch.float32, torch.bfloat16, torch.int8, torch.float8_e4m3fn
# compute dtype -> (atol, rtol): fp32 dots are exact products summed in fp32; 16-bit ones also round
# the probabilities before P @ V, as flash attention does
TOL = {f32: (1e-5, 1e-5), f16: (2e-3, 2e-3), bf16: (2e-2, 2e-2)}


def nan_cache(shape, dtype):
    """A cache every slot of which reads as NaN (a quantized row: all bytes 0xFF, its scale a NaN)."""
    shape = (*shape[:-1], row_width(shape[-1], dtype))
    if dtype in (i8, fp8):
        return torch.full(shape, 255, dtype=torch.uint8).view(dtype)
    return torch.full(shape, float("nan"), dtype=dtype)


def make_step(device, Hkv, rep, D, bs, seq_lens, q_lens, q_dtype=f32, cache_dtype=f32, seed=0,
              index_dtype=torch.int64, max_blocks=None):
    """A step's inputs: scattered block ids (some blocks in no table), every unwritten slot NaN."""
    g = torch.Generator().manual_seed(seed)
    S = len(seq_lens)
    max_blocks = max_blocks or max(-(-n // bs) for n in seq_lens) + 1  # the last column: a NaN block
    num_blocks = S * max_blocks + 3
    block_tables = torch.randperm(num_blocks, generator=g)[: S * max_blocks].view(S, max_blocks)
    kv_cache = nan_cache((2, 2, num_blocks, bs, Hkv, D), cache_dtype)
    layer = 1
    for s, n in enumerate(seq_lens):
        slots = torch.tensor([int(block_tables[s, p // bs]) * bs + p % bs for p in range(n)])
        reshape_and_cache_impl(kv_cache, layer, torch.randn(n, Hkv, D, generator=g),
                               torch.randn(n, Hkv, D, generator=g), slots)
    q = torch.randn(sum(q_lens), Hkv * rep, D, generator=g).to(q_dtype)
    qsl = torch.tensor([0] + q_lens).cumsum(0)
    return (q.to(device), kv_cache.to(device), layer, block_tables.to(device, index_dtype),
            torch.tensor(seq_lens, device=device, dtype=index_dtype), qsl.to(device, index_dtype), D ** -0.5)


def check_attention(args, **kw):
    q, kv_cache = args[0], args[1]
    out = paged_attention_triton(*args, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    dt = kv_cache.dtype if kv_cache.dtype.itemsize < q.dtype.itemsize else q.dtype  # what the op computes in
    dt = q.dtype if is_quantized(kv_cache) else dt
    ref = paged_attention_ref(q.to(dt).to(q.dtype), *args[1:])  # fp32 math over the same rounded operands
    atol, rtol = TOL[dt]
    torch.testing.assert_close(out.cpu(), ref.cpu(), atol=atol, rtol=rtol)


# --- reshape_and_cache --------------------------------------------------------------------

@pytest.mark.parametrize("bs, key_dtype, cache_dtype", [(1, f32, f32), (5, f32, f16), (4, f16, f32), (4, f32, i8),
                                                        (3, f16, fp8)])
def test_reshape_and_cache_equals_impl(kernel_device, bs, key_dtype, cache_dtype):
    g = torch.Generator().manual_seed(bs)
    T, H, D, num_blocks = 7, 3, 12, 8
    if is_quantized(torch.empty(0, dtype=cache_dtype)):  # rows of arbitrary bytes
        kv = torch.randint(0, 256, (2, 2, num_blocks, bs, H, D + 2), generator=g, dtype=torch.uint8).view(cache_dtype)
    else:
        kv = torch.randn(2, 2, num_blocks, bs, H, D, generator=g).to(cache_dtype)
    key = torch.randn(T, H, D, generator=g).to(key_dtype)
    value = torch.randn(T, H, D, generator=g).to(key_dtype)
    slots = torch.randperm(num_blocks * bs, generator=g)[:T]
    slots[[1, 4]] = -1  # padding rows: skipped
    expect = kv.clone()
    reshape_and_cache_impl(expect, 1, key, value, slots)
    got = kv.to(kernel_device)
    reshape_and_cache_triton(got, 1, key.to(kernel_device), value.to(kernel_device), slots.to(kernel_device))
    assert torch.equal(got.cpu().view(torch.uint8), expect.view(torch.uint8))


def test_reshape_and_cache_strided_key(kernel_device):
    """key and value as slices of one fused qkv output: rows strided, head_dim contiguous."""
    g = torch.Generator().manual_seed(0)
    kv = torch.zeros(1, 2, 3, 4, 2, 8)
    qkv = torch.randn(5, 3, 2, 8, generator=g)  # [T, q|k|v, H, D]
    slots = torch.tensor([11, 0, -1, 6, 3])
    expect = kv.clone()
    reshape_and_cache_impl(expect, 0, qkv[:, 1], qkv[:, 2], slots)
    got, qkv = kv.to(kernel_device), qkv.to(kernel_device)
    reshape_and_cache_triton(got, 0, qkv[:, 1], qkv[:, 2], slots.to(kernel_device))
    assert torch.equal(got.cpu(), expect)


# --- paged_attention: decode --------------------------------------------------------------

@pytest.mark.parametrize("rep, bs, D, q_dtype, cache_dtype, seq_lens, split", [
    (1, 16, 16, f32, f32, [1, 100, 37], {}),                                   # heuristic: one split
    (3, 5, 8, f16, f16, [100, 1, 64], dict(num_splits=3, block_n=16)),         # splits, some empty
    (8, 1, 16, f32, f32, [1, 97], dict(num_splits=4, block_n=16)),
    (3, 4, 12, f32, f16, [33, 70], dict(num_splits=2, block_n=16)),            # fp32 queries, fp16 cache
    (3, 4, 16, f32, i8, [33, 70], dict(num_splits=2, block_n=16)),             # int8 cache
    (1, 5, 12, f16, fp8, [1, 100, 37], {}),                                    # fp8 cache, D 12
], ids=["mha-bs16", "gqa3-bs5-fp16-split3", "gqa8-bs1-split4", "fp16cache-D12-split2", "int8cache-split2",
        "fp8cache-fp16q-D12"])
def test_decode_equals_ref(kernel_device, rep, bs, D, q_dtype, cache_dtype, seq_lens, split):
    args = make_step(kernel_device, 2, rep, D, bs, seq_lens, [1] * len(seq_lens), q_dtype, cache_dtype)
    check_attention(args, **split)


def test_decode_split_plan():
    """Splits cover the longest context in whole KV tiles, none of them empty. A step whose
    programs (sequences x KV heads) fill the SMs (one per SM at 256 bytes a head, two at 128) is
    not split; one that leaves them idle is, when its context has room for two splits. A split
    walks at least ``_MIN_TILES_PER_SPLIT`` tiles, and splitting never asks for much more than
    ``_SPLIT_TARGET_PER_SM`` programs per SM. A forced count is kept, clamped to the tiles."""
    sms = 132
    cases = itertools.product([1, 2, 4, 32, 64], [1, 2, 8, 32], [1, 20, 97, 100, 2000, 2048, 8192], [16, 64, 128],
                              [128, 256, 512])
    for S, Hkv, ctx, block_n, head_bytes in cases:  # sequences, KV heads, longest context, KV tile, bytes a head
        n, size = decode_split_plan(S, Hkv, ctx, block_n, sms, head_bytes=head_bytes)
        tiles, programs = -(-ctx // block_n), S * Hkv
        assert size % block_n == 0 and n * size >= ctx > (n - 1) * size, (S, Hkv, ctx, block_n, n, size)
        full = programs >= sms * max(1, 256 // head_bytes)
        assert n == 1 or (not full and size // block_n >= _MIN_TILES_PER_SPLIT), (S, Hkv, ctx, block_n, n, size)
        if not full and tiles >= 2 * _MIN_TILES_PER_SPLIT:
            assert n > 1, (S, Hkv, ctx, block_n, head_bytes)
        assert programs * n < _SPLIT_TARGET_PER_SM * sms + programs, (S, Hkv, ctx, block_n, n)
    assert decode_split_plan(2, 2, 97, 16, sms, num_splits=4)[0] == 4  # 7 tiles as 2+2+2+1
    assert decode_split_plan(2, 2, 20, 16, sms, num_splits=4) == (2, 16)  # 2 tiles: clamped
    assert decode_split_plan(64, 32, 2048, 128, sms, num_splits=8)[0] == 8  # forced past the heuristic


# --- paged_attention: prompts, chunks, mixed ------------------------------------------------

@pytest.mark.parametrize("rep, bs, D, q_dtype, cache_dtype, seq_lens, q_lens, kw", [
    (1, 4, 16, f32, f32, [20, 7], [20, 7], {}),                                     # whole prompts
    (3, 16, 8, f16, f16, [90, 40], [13, 40], {}),                                   # chunk after 77 cached
    (8, 1, 16, f32, f32, [40, 9, 30, 2], [1, 9, 17, 1], dict(block_n=16)),          # mixed: decode, prompt, chunk
    (3, 5, 12, f32, f16, [23, 1, 50], [6, 1, 50], dict(block_n=16)),                # fp16 cache, D 12
    (1, 4, 16, f16, i8, [20, 47], [20, 9], {}),                                     # int8 cache, a chunk
    (3, 5, 12, f32, fp8, [23, 1, 50], [6, 1, 50], dict(block_n=16)),                # fp8 cache, mixed
], ids=["mha-prompts", "gqa3-fp16-chunk", "gqa8-bs1-mixed", "fp16cache-bs5-mixed", "int8cache-chunk",
        "fp8cache-bs5-mixed"])
def test_prefill_equals_ref(kernel_device, rep, bs, D, q_dtype, cache_dtype, seq_lens, q_lens, kw):
    args = make_step(kernel_device, 2, rep, D, bs, seq_lens, q_lens, q_dtype, cache_dtype, seed=len(q_lens),
                     index_dtype=torch.int32)
    check_attention(args, **kw)


@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])  # the fixture is a constant
@given(st.data())
def test_random_steps_equal_ref(kernel_device, data):
    """Drawn batches: decode steps (forced split counts included) and mixed prompt/chunk/decode steps."""
    Hkv, rep = data.draw(st.sampled_from([1, 2])), data.draw(st.sampled_from([1, 3, 8]))
    D, bs = data.draw(st.sampled_from([8, 16])), data.draw(st.sampled_from([1, 4, 5, 16]))
    seq_lens = data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=4))
    decode = data.draw(st.booleans(), label="decode step")
    q_lens = [1] * len(seq_lens) if decode else [data.draw(st.integers(1, n)) for n in seq_lens]
    q_dtype, cache_dtype = data.draw(st.sampled_from([(f32, f32), (f16, f16), (f32, f16), (f32, i8), (f16, fp8)]))
    kw = dict(block_n=data.draw(st.sampled_from([None, 16])))
    if decode:
        kw["num_splits"] = data.draw(st.sampled_from([None, 2, 3]))
    args = make_step(kernel_device, Hkv, rep, D, bs, seq_lens, q_lens, q_dtype, cache_dtype,
                     seed=data.draw(st.integers(0, 2**16)))
    check_attention(args, **kw)


# --- GPU only: bf16, opcheck, CUDA graphs ---------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("q_lens", [[1] * 6, [1, 100, 1, 64, 1, 1]], ids=["decode", "mixed"])
@pytest.mark.parametrize("rep, bs, cache_dtype", [(1, 16, bf16), (4, 16, bf16), (8, 5, bf16), (4, 16, i8),
                                                  (8, 5, fp8)])
def test_bf16_on_cuda(rep, bs, cache_dtype, q_lens):
    seq_lens = [1, 300, 2047, 129, 64, 700]
    args = make_step("cuda", 4, rep, 128, bs, seq_lens, q_lens, bf16, cache_dtype)
    check_attention(args)
    if q_lens[0] == 1 and len(set(q_lens)) == 1:
        check_attention(args, num_splits=5)


@pytest.mark.gpu
def test_opcheck_cuda():
    from qcompiler.codegen import triton_attention  # noqa: F401  (registers the CUDA kernels)

    qc = torch.ops.qc
    kv = torch.randn(1, 2, 6, 4, 2, 16, device="cuda", dtype=bf16)
    kw = dict(device="cuda", dtype=bf16)
    torch.library.opcheck(qc.reshape_and_cache, (kv, 0, torch.randn(3, 2, 16, **kw), torch.randn(3, 2, 16, **kw),
                                                 torch.tensor([0, -1, 9], device="cuda")))
    tables = torch.tensor([[0, 1], [2, 3]], device="cuda")
    for q_len, lens, qsl in ((3, [5, 2], [0, 2, 3]), (2, [7, 2], [0, 1, 2])):
        torch.library.opcheck(qc.paged_attention, (torch.randn(q_len, 4, 16, **kw), kv, 0, tables,
                                                   torch.tensor(lens, device="cuda"),
                                                   torch.tensor(qsl, device="cuda"), 0.25))


@pytest.mark.gpu
@pytest.mark.parametrize("q_lens", [[1, 1, 1], [5, 1, 30]], ids=["decode", "mixed"])
def test_cuda_graph_replay(q_lens):
    """Captured once, replayed over new metadata of the same shapes: no host sync, no stale sizes."""
    args = list(make_step("cuda", 2, 4, 64, 16, [40, 200, 31], q_lens, bf16, bf16, max_blocks=16))
    torch.cuda.set_sync_debug_mode("error")
    try:
        paged_attention_triton(*args)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = paged_attention_triton(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    new = make_step("cuda", 2, 4, 64, 16, [90, 31, 33], q_lens, bf16, bf16, seed=1, max_blocks=16)
    assert new[1].shape == args[1].shape and new[3].shape == args[3].shape
    for i in (0, 1, 3, 4, 5):
        args[i].copy_(new[i])
    graph.replay()
    check = paged_attention_ref(*new)
    torch.testing.assert_close(out, check, atol=2e-2, rtol=2e-2)
