"""Quantized KV caches (int8, fp8 e4m3; a bf16 scale per token and KV head in each row): the
write/read round trip within its grid's error, the CPU decode kernel and the ATen paths against
the reference over the same rows, compiled writes bit for bit, block copies carrying scales, the
engine's greedy decode and pool accounting under forks, preemption and prefix reuse, the pool's
size from the real bytes a block, and ``qcompile eval --kv-cache-dtype``."""
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler import LLM, BeamSearchParams, SamplingParams
from qcompiler.codegen import cpu_native
from qcompiler.codegen.attention import (dequantize_kv, new_kv_cache, paged_attention_for_compile,
                                         paged_attention_impl, paged_attention_ref, quantize_kv,
                                         reshape_and_cache_for_compile, reshape_and_cache_impl)
from qcompiler.compiler import compile_model
from qcompiler.models import load_source
from qcompiler.targets import Float
from tests_paths import FIXTURES

I8, FP8 = torch.int8, torch.float8_e4m3fn
QMAX = {I8: 127.0, FP8: 448.0}


def values(draw, shape, outlier: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(*shape, generator=g) * draw(st.sampled_from([1e-3, 1.0, 30.0]))
    if outlier:  # one channel of one token 100x the rest, as attention sinks make keys
        x[0, ..., 0] *= 100
    return x


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_round_trip_error_within_the_grid(data):
    """Each row's scale is its absmax over the largest code, rounded to bf16; int8 recovers every
    element within half a step of the grid, fp8 within e4m3's relative step (or its smallest
    subnormal step near zero). Zero rows stay zero."""
    dt = data.draw(st.sampled_from([I8, FP8]))
    T, H, D = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 4)), data.draw(st.sampled_from([2, 8, 64]))
    x = values(data.draw, (T, H, D), data.draw(st.booleans()))
    x[-1, -1] = 0.0
    rows = quantize_kv(x, dt)
    assert rows.dtype == dt and rows.shape == (T, H, D + 2)
    scale = rows[..., D:].view(torch.bfloat16).float()
    expect_scale = (x.abs().amax(-1, keepdim=True) / QMAX[dt]).to(torch.bfloat16).float()
    assert torch.equal(scale[x.abs().amax(-1) > 0], expect_scale[x.abs().amax(-1) > 0])
    y = dequantize_kv(rows)
    assert y.shape == x.shape and torch.equal(y[-1, -1], torch.zeros(D))
    err = (y - x).abs()
    if dt == I8:  # the bf16 scale may round down: the largest element may clip by its rounding
        bound = scale * 0.5 + x.abs().amax(-1, keepdim=True) * 2.0 ** -8
    else:
        bound = x.abs() * 2.0 ** -4 + scale * 2.0 ** -9 + x.abs().amax(-1, keepdim=True) * 2.0 ** -8
    assert bool((err <= bound * 1.0001).all()), float((err - bound).max())


@pytest.mark.parametrize("dt", [I8, FP8])
def test_compiled_write_equals_the_op(dt):
    """What a compiled CPU program writes (Inductor over ``reshape_and_cache_for_compile``) is
    byte for byte what the op writes: codes taken against the rounded scale, as stored."""
    g = torch.Generator().manual_seed(1)
    kv = new_kv_cache(2, 5, 4, 2, 16, dt)
    expect = kv.clone()
    write = torch.compile(reshape_and_cache_for_compile, dynamic=True)
    for layer, slots in ((1, [7, 0, 19]), (0, [4]), (1, [12, 13])):
        k, v = (torch.randn(len(slots), 2, 16, generator=g) * 5 for _ in range(2))
        write(kv, layer, k, v, torch.tensor(slots))
        torch.ops.qc.reshape_and_cache(expect, layer, k, v, torch.tensor(slots))
        assert torch.equal(kv.view(torch.uint8), expect.view(torch.uint8)), (layer, slots)


def step(draw, dt, D, decode):
    """A cache with holes (rows no sequence wrote hold other valid rows) and a step over it."""
    Hkv, rep, bs = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 3, 8])), draw(st.sampled_from([1, 4, 16]))
    seq_lens = draw(st.lists(st.integers(1, 40), min_size=1, max_size=4))
    q_lens = [1] * len(seq_lens) if decode else [draw(st.integers(1, n)) for n in seq_lens]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    nb = max(-(-n // bs) for n in seq_lens)
    tables = torch.randperm(len(seq_lens) * nb + 2, generator=g)[: len(seq_lens) * nb].view(-1, nb)
    kv = quantize_kv(torch.randn(2, 2, len(seq_lens) * nb + 2, bs, Hkv, D, generator=g) * 3, dt)
    for s, n in enumerate(seq_lens):
        slots = torch.tensor([int(tables[s, p // bs]) * bs + p % bs for p in range(n)])
        k, v = (values(draw, (n, Hkv, D), draw(st.booleans())) for _ in range(2))
        reshape_and_cache_impl(kv, 1, k, v, slots)
    q = torch.randn(sum(q_lens), Hkv * rep, D, generator=g)
    return q, kv, tables, torch.tensor(seq_lens), torch.tensor([0] + q_lens).cumsum(0)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_attention_over_a_quantized_cache_equals_reference(data):
    """Prefill, chunks and decode steps through the op's ATen paths read the rows the reference
    dequantizes; so does ``qc_cpu::paged_decode`` where it is built (fp32 and bf16 queries)."""
    dt, decode = data.draw(st.sampled_from([I8, FP8])), data.draw(st.booleans())
    D = data.draw(st.sampled_from([16, 64] if decode else [8, 16]))
    q, kv, tables, lens, qsl = step(data.draw, dt, D, decode)
    ref = paged_attention_ref(q, kv, 1, tables, lens, qsl, D ** -0.5)
    big = float(ref.abs().max())  # fp32 sums in another order: errors scale with the values (outliers 3000)
    out = paged_attention_impl(q, kv, 1, tables, lens, qsl, D ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * big)
    if decode and cpu_native.available():
        for q_dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
            out = torch.ops.qc_cpu.paged_decode(q.to(q_dt), kv, 1, tables, lens, D ** -0.5, 0)
            ref = paged_attention_ref(q.to(q_dt).float(), kv, 1, tables, lens, qsl, D ** -0.5)
            torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * big)


def test_native_decode_window_and_bad_row_width():
    if not cpu_native.available():
        pytest.skip("our CPU kernels need AVX-512 and g++")
    g = torch.Generator().manual_seed(0)
    kv = new_kv_cache(1, 8, 4, 2, 32, I8)
    reshape_and_cache_impl(kv, 0, torch.randn(30, 2, 32, generator=g), torch.randn(30, 2, 32, generator=g),
                           torch.arange(30))
    q, tables, lens = torch.randn(2, 4, 32, generator=g), torch.arange(8).view(1, 8).expand(2, 8), torch.tensor([30, 9])
    out = torch.ops.qc_cpu.paged_decode(q, kv, 0, tables.contiguous(), lens, 0.2, 5)
    ref = paged_attention_ref(q, kv, 0, tables, lens, torch.arange(3), 0.2, window=5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="query heads 4 x 32 vs cache heads 2 x 32"):  # int8 rows need 34
        torch.ops.qc_cpu.paged_decode(q, kv[..., :32].contiguous(), 0, tables.contiguous(), lens, 0.2, 0)


@pytest.fixture(scope="module")
def tiny(tiny_artifacts):
    """The float tiny-Llama artifact (the session's, compiled once for every test file)."""
    return tiny_artifacts[1]["float"].out


GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def prompts(n, seed, lo=2, hi=40, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(0, 200, (int(torch.randint(lo, hi, (1,), generator=g)),),
                                         generator=g).tolist() for _ in range(n)]


def check_pool(llm):
    st_ = llm.stats()
    assert st_["blocks_free"] == st_["blocks_total"] - st_["blocks_cached"], st_
    assert st_["running"] == st_["waiting"] == 0


def test_int8_greedy_equals_float_cache(tiny):
    """Greedy decode over an int8 cache picks the float cache's tokens on the tiny model, whether
    prompts run whole, in chunks, or are preempted and recomputed."""
    ps = prompts(5, seed=3)
    ref = [o.token_ids for o in LLM(tiny, kv_cache_dtype="float32").generate(ps, GREEDY)]
    for kw in (dict(), dict(num_blocks=14, block_size=4, max_num_batched_tokens=8)):  # chunked and preempted
        llm = LLM(tiny, kv_cache_dtype="int8", **kw)
        assert [o.token_ids for o in llm.generate(ps, GREEDY)] == ref, kw
        check_pool(llm)


@pytest.mark.parametrize("dt", ["int8", "fp8"])
def test_prefix_reuse_and_forks_over_a_quantized_cache(tiny, dt):
    """Blocks reused from the radix cache, forked by ``n > 1`` and by beam search (copy-on-write
    of a partly filled block, its scales with it) and preempted give what a fresh run without
    prefix caching gives; every block returns to the pool."""
    shared = prompts(1, seed=9, lo=37, hi=38)[0]
    ps = prompts(4, seed=5, prefix=shared)
    fresh = [o.token_ids for o in LLM(tiny, kv_cache_dtype=dt, prefix_cache=False).generate(ps, GREEDY)]
    llm = LLM(tiny, kv_cache_dtype=dt, block_size=4)
    assert [o.token_ids for o in llm.generate(ps, GREEDY)] == fresh
    assert [o.token_ids for o in llm.generate(ps[:2], GREEDY)] == fresh[:2]  # now served from the cache
    assert llm.stats()["blocks_cached"] > 0
    out = llm.generate(ps[:1], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, n=3))[0]
    assert [c.token_ids for c in out.samples] == [fresh[0][:8]] * 3
    beams = llm.beam_search([ps[1]], BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True))[0]
    assert len(beams.sequences) == 3 and beams.num_cached_tokens > 0
    check_pool(llm)


def test_copy_blocks_carries_scales(tiny):
    """Copy-on-write copies a quantized block's rows whole: codes and scales."""
    runner = LLM(tiny, kv_cache_dtype="fp8", num_blocks=6, block_size=4).engine.runner
    b = runner.kv_cache.view(torch.uint8)
    b[:, :, 1].random_(0, 256)
    runner.copy_blocks([(1, 4)])
    assert torch.equal(b[:, :, 4], b[:, :, 1]) and not torch.equal(b[:, :, 4], b[:, :, 2])


def test_pool_holds_about_twice_the_bf16_tokens(tiny):
    """The pool is sized by the real bytes of a block, scales included: the same memory holds
    (D * 2) / (D + 2) times the blocks of a bf16 cache, and the cache never exceeds it."""
    budget = 1 << 20
    blocks = {}
    for dt in ("bfloat16", "int8", "fp8"):
        cache = LLM(tiny, kv_cache_dtype=dt, kv_cache_memory=budget).engine.runner.kv_cache
        assert cache.numel() * cache.element_size() <= budget
        blocks[dt] = cache.shape[2]
    D = 32  # tiny_llama's head_dim
    for dt in ("int8", "fp8"):
        assert blocks[dt] == pytest.approx(blocks["bfloat16"] * 2 * D / (D + 2), abs=2)


def test_eval_json_chunked_through_the_cache(tmp_path, capsys):
    """``qcompile eval --kv-cache-dtype float32`` prefills each window in chunks that read the
    earlier tokens back from the cache: the same perplexity as one prefill a window; int8 and fp8
    stay close to it. ``--json`` ends the output with one JSON object."""
    from qcompiler.cli import main
    art = tmp_path / "chat"
    compile_model(load_source(str(FIXTURES / "chat_lm.py")), Float(), art)
    got = {}
    for dt in (None, "float32", "int8", "fp8"):
        argv = ["eval", str(art), "--windows", "2", "--window-len", "64", "--json", "-q"]
        argv += [] if dt is None else ["--kv-cache-dtype", dt, "--prefill-chunk", "24"]
        assert main(argv) == 0
        rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert rec["tokens"] == 128 and rec["kv_cache_dtype"] == dt
        got[dt] = rec["perplexity"]
    assert got["float32"] == pytest.approx(got[None], rel=1e-4)
    assert got["int8"] == pytest.approx(got[None], rel=0.01) and got["fp8"] == pytest.approx(got[None], rel=0.05)
    assert all(math.isfinite(v) for v in got.values())


def test_quantized_cache_refuses_an_artifact_with_fixed_rows(tiny, tmp_path):
    """Artifacts of format 2 fixed the cache's row width in their program: they still load and
    serve 16/32-bit caches, and refuse int8/fp8 with one line saying to recompile."""
    import shutil
    old = tmp_path / "old"
    shutil.copytree(tiny, old)
    man = json.loads((old / "manifest.json").read_text())
    man["format_version"] = 2
    (old / "manifest.json").write_text(json.dumps(man))
    assert len(LLM(old, kv_cache_dtype="bfloat16").generate([[1, 2, 3]], GREEDY)[0].token_ids) == 16
    with pytest.raises(ValueError, match="an int8 KV cache needs an artifact of format 3 .* recompile the model"):
        LLM(old, kv_cache_dtype="int8")


def test_compiled_decode_without_our_kernel(monkeypatch):
    """Where ``qc_cpu::paged_decode`` is not built, a compiled program traces decode attention
    as ATen ops: the quantized rows (fp8 here; int8 takes the same ops) are gathered and
    dequantized inside the graph."""
    dt = FP8
    monkeypatch.setattr(cpu_native, "_BUILT", False)
    g = torch.Generator().manual_seed(0)
    kv = quantize_kv(torch.randn(2, 2, 12, 4, 2, 16, generator=g), dt)
    tables, lens = torch.randperm(12, generator=g)[:9].view(3, 3), torch.tensor([5, 12, 9])
    q = torch.randn(3, 6, 16, generator=g)
    out = torch.compile(paged_attention_for_compile, dynamic=True)(q, kv, 1, tables, lens, torch.arange(4), 0.25)
    torch.testing.assert_close(out, paged_attention_ref(q, kv, 1, tables, lens, torch.arange(4), 0.25),
                               rtol=1e-5, atol=1e-5)
