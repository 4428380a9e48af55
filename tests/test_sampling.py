"""Sampler: greedy is argmax, top-k and top-p keep exactly the tokens they should, seeds repeat;
the batched sampler and its native form against a per-row reference and the distribution it
should draw from."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.codegen import cpu_native
from qcompiler.runtime import sampling
from qcompiler.runtime.sampling import SamplingParams, sample

NATIVE = cpu_native.available()


@pytest.fixture(params=["torch", "native"])
def sampler(request, monkeypatch):
    """The PyTorch sampler, or ``qc_cpu::sample_rows`` where the native kernels build."""
    if request.param == "native" and not NATIVE:
        pytest.skip("the native CPU kernels are not available here (no AVX-512 or no compiler)")
    monkeypatch.setattr(cpu_native, "built", lambda: request.param == "native")


def test_greedy_is_argmax():
    assert sample(torch.tensor([0.1, 3.0, -1.0, 2.9]), SamplingParams(temperature=0.0), None) == 1


def _support(logits, params, n=400):
    g = torch.Generator().manual_seed(0)
    return {sample(logits, params, g) for _ in range(n)}


def test_top_k_and_top_p_support(sampler):
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert _support(logits, SamplingParams(top_k=2)) == {0, 1}
    assert _support(logits, SamplingParams(top_p=0.7)) == {0, 1}      # 0.5 < 0.7 <= 0.8
    assert _support(logits, SamplingParams(top_p=0.5)) == {0}
    assert _support(logits, SamplingParams(top_p=1.0)) == {0, 1, 2, 3}


def test_seed_repeats_and_temperature_sharpens(sampler):
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=0.7, seed=3)
    a = [sample(logits, p, torch.Generator().manual_seed(3)) for _ in range(5)]
    b = [sample(logits, p, torch.Generator().manual_seed(3)) for _ in range(5)]
    assert a == b
    gap = torch.tensor([0.0, 1.0, 3.0, 2.0])  # at temperature 0.05 the runner-up is e^-20 as likely
    assert _support(gap, SamplingParams(temperature=0.05)) == {2}
    assert _support(gap, SamplingParams(temperature=1.0)) == {0, 1, 2, 3}


@pytest.mark.parametrize("kw,msg", [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
                                    (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k")])
def test_bad_params(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def random_case(seed: int, rows: int, vocab: int, scale: float):
    """Random logits and per-row parameters: temperature, top-k on every other row, top-p (1 a
    quarter of the time)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * scale

    def draw(lo, hi):
        return float(torch.empty(()).uniform_(lo, hi, generator=g))
    params = [SamplingParams(temperature=draw(0.1, 2.0), top_k=int(torch.randint(0, vocab + 2, (), generator=g)) * (i % 2),
                             top_p=min(1.0, draw(0.05, 1.3))) for i in range(rows)]
    return logits, params


@settings(max_examples=60)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 6), vocab=st.integers(2, 300),
       levels=st.sampled_from([(0.5, 0.0), (0.9, 1e-3, 0.0), sampling.NUCLEUS_LEVELS]))
def test_batched_probs_equal_the_reference(seed, rows, vocab, levels):
    """Mixed per-row temperature / top-k / top-p in one batch against full sorts per row; high
    nucleus levels force the search past its first levels, down to the whole-row sort."""
    logits, params = random_case(seed, rows, vocab, scale=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampling, "NUCLEUS_LEVELS", levels)
        probs = sampling.sampling_probs(logits, params)
    for i, p in enumerate(params):
        torch.testing.assert_close(probs[i] / probs[i].sum(), sampling.sampling_probs_ref(logits[i], p),
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.5),
                                    SamplingParams(top_k=2), SamplingParams(top_p=0.7)])
def test_batched_draws_follow_the_distribution(sampler, params):
    logits = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    n = 20000
    toks = sampling.sample_batch(logits.expand(n, -1), [params] * n, [None] * n)
    freq = torch.bincount(torch.tensor(toks), minlength=6).double() / n
    expected = sampling.sampling_probs_ref(logits, params)
    assert (freq - expected).abs().max() < 0.015, (freq, expected)  # ~4 standard deviations
    assert set(toks) == set(expected.nonzero().flatten().tolist())


def test_batch_rows_draw_from_their_own_generators(sampler):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0.9, seed=1), SamplingParams(top_k=5), SamplingParams(top_p=0.8, seed=2)]
    batch = sampling.sample_batch(logits, params, [torch.Generator().manual_seed(p.seed or 0) for p in params])
    alone = [sample(logits[i], p, torch.Generator().manual_seed(p.seed or 0)) for i, p in enumerate(params)]
    assert batch == alone


@pytest.mark.skipif(not NATIVE, reason="the native CPU kernels are not available here")
@settings(max_examples=40)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5), vocab=st.integers(1, 200))
def test_native_draws_invert_the_reference_cdf(seed, rows, vocab):
    """``qc_cpu::sample_rows`` at a grid of uniforms u returns, for each, the token where the
    reference distribution's CDF crosses u (within rounding)."""
    logits, params = random_case(seed, rows, vocab, scale=4)
    grid = torch.tensor([0.0, 0.999999] + [(j + 0.5) / 64 for j in range(64)])
    for i, p in enumerate(params):
        cdf = sampling.sampling_probs_ref(logits[i], p).cumsum(0)
        n = len(grid)
        toks = torch.ops.qc_cpu.sample_rows(logits[i].expand(n, -1).contiguous(), torch.full((n,), p.temperature),
                                            torch.full((n,), p.top_k), torch.full((n,), p.top_p), grid)
        below = torch.cat([torch.zeros(1, dtype=cdf.dtype), cdf])[toks]  # mass before the token drawn
        assert ((below <= grid + 1e-5) & (grid < cdf[toks] + 1e-5)).all(), (p, toks, grid)
        probs = sampling.sampling_probs_ref(logits[i], p)
        assert (probs[toks] > 0).all()


@pytest.mark.skipif(not NATIVE, reason="the native CPU kernels are not available here")
def test_native_sampler_rejects_bad_rows():
    with pytest.raises(RuntimeError, match="temperature > 0"):
        torch.ops.qc_cpu.sample_rows(torch.zeros(1, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long),
                                     torch.ones(1), torch.zeros(1))
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        torch.ops.qc_cpu.sample_rows(torch.zeros(1, 4, dtype=torch.float64), torch.ones(1),
                                     torch.zeros(1, dtype=torch.long), torch.ones(1), torch.zeros(1))
