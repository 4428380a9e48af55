"""Sampler: greedy is argmax, top-k and top-p keep exactly the tokens they should, seeds repeat."""
import pytest
import torch

from qcompiler.runtime.sampling import SamplingParams, sample


def test_greedy_is_argmax():
    assert sample(torch.tensor([0.1, 3.0, -1.0, 2.9]), SamplingParams(temperature=0.0), None) == 1


def _support(logits, params, n=400):
    g = torch.Generator().manual_seed(0)
    return {sample(logits, params, g) for _ in range(n)}


def test_top_k_and_top_p_support():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert _support(logits, SamplingParams(top_k=2)) == {0, 1}
    assert _support(logits, SamplingParams(top_p=0.7)) == {0, 1}      # 0.5 < 0.7 <= 0.8
    assert _support(logits, SamplingParams(top_p=0.5)) == {0}
    assert _support(logits, SamplingParams(top_p=1.0)) == {0, 1, 2, 3}


def test_seed_repeats_and_temperature_sharpens():
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
