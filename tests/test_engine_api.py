"""What the serving API needs from the engine, against the eager model: log-probs of generated
and prompt tokens, logit processors (bias, penalties, ``min_tokens``), and abort at every stage
of a request with every block returned."""
import pytest
import torch

from qcompiler import LLM, SamplingParams
from qcompiler.runtime.sampling import process_logits
from test_engine import VOCAB, artifact, check_pool, greedy_ref, prompts  # noqa: F401  (artifact: a fixture)


def eager_logprobs(model, ids):
    """log_softmax of the eager model's logits at every position of ``ids``: [len, V]."""
    with torch.no_grad():
        x = torch.tensor(ids)[None]
        return torch.log_softmax(model(input_ids=x, position_ids=torch.arange(len(ids))[None])[0].float(), -1)


@pytest.mark.parametrize("kw", [dict(), dict(max_num_batched_tokens=5)])  # prompts whole, or in chunks
def test_logprobs_and_prompt_logprobs_equal_the_eager_model(artifact, kw):
    out, model = artifact
    llm = LLM(out, kv_cache_dtype="float32", **kw)
    ps = prompts(3, seed=7, lo=6, hi=20)
    llm.generate(ps[:1], SamplingParams(max_tokens=2, temperature=0.0))  # a cached prefix must not hide rows
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    for p, o in zip(ps, llm.generate(ps, params)):
        full = p + o.token_ids
        ref = eager_logprobs(model, full)
        assert len(o.logprobs) == 6 and len(o.prompt_logprobs) == len(p) and o.prompt_logprobs[0] is None
        for i, (lp, top) in enumerate(o.logprobs):  # token len(p)+i, predicted by row len(p)+i-1
            r = ref[len(p) + i - 1]
            assert lp == pytest.approx(float(r[full[len(p) + i]]), abs=1e-4)
            assert [t for t, _ in top] == r.topk(3).indices.tolist() and top[0][0] == o.token_ids[i]
            assert [v for _, v in top] == pytest.approx(r.topk(3).values.tolist(), abs=1e-4)
        for j in range(1, len(p)):
            lp, top = o.prompt_logprobs[j]
            assert lp == pytest.approx(float(ref[j - 1, p[j]]), abs=1e-4) and len(top) == 2
    check_pool(llm)


def test_logit_processors_steer_greedy_decoding(artifact):
    out, model = artifact
    llm = LLM(out)
    p = prompts(1, seed=3, lo=8, hi=9)[0]
    base = greedy_ref(model, p, 8)
    target = (base[0] + 1) % VOCAB
    biased = llm.generate([p], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                              logit_bias={target: 100.0}))[0]
    assert biased.token_ids == [target] * 8
    fresh = llm.generate([p], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                             presence_penalty=2.0, frequency_penalty=2.0,
                                             logit_bias={target: 3.0}))[0]
    assert fresh.token_ids.count(target) < 8  # the penalties grow with each repeat: the bias stops winning
    stop_at = base[0]
    held = llm.generate([p], SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=(stop_at,),
                                            min_tokens=3))[0]
    assert held.token_ids[:3].count(stop_at) == 0 and len(held.token_ids) >= 3
    check_pool(llm)


def test_process_logits_rules():
    row = torch.tensor([2.0, -2.0, 1.0, 0.5, 3.0])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={3: 1.0},
                       min_tokens=2, max_tokens=4)
    got = process_logits(row.clone(), p, prompt=[0], output=[1, 1], eos=[4])
    # 2 tokens out: EOS (4) free again; 0 in the prompt: 2 / 2; 1 out twice: -2 * 2 - (0.25 * 2 + 0.5); 3 biased
    assert got.tolist() == pytest.approx([1.0, -4.0 - 1.0, 1.0, 1.5, 3.0])
    got = process_logits(row.clone(), p, prompt=[0], output=[1], eos=[4])
    assert got[4] == float("-inf")


@pytest.mark.parametrize("where", ["waiting", "prefilling", "decoding", "forked"])
def test_abort_returns_every_block_at_any_stage(artifact, where):
    out, _ = artifact
    llm = LLM(out, num_blocks=24, block_size=4, max_num_batched_tokens=6, max_num_seqs=2)
    eng = llm.engine
    ps = prompts(3, seed=5, lo=14, hi=16)
    n = 3 if where == "forked" else 1
    reqs = [eng.add_request(p, SamplingParams(max_tokens=30, temperature=0.8, seed=1, ignore_eos=True, n=n))
            for p in ps]
    steps = {"waiting": 1, "prefilling": 1, "decoding": 6, "forked": 6}[where]
    for _ in range(steps):
        eng.step()
    victim = reqs[2] if where == "waiting" else reqs[0]
    seq = victim.seq
    assert (seq in eng.scheduler.waiting) == (where == "waiting")
    if where == "prefilling":
        assert 0 < seq.num_computed_tokens < seq.num_prompt_tokens
    if where == "forked":
        assert len(victim.children) == 2
    eng.abort(victim)
    assert victim.done and victim.finish_reason == "abort"
    assert all(c.finish_reason == "abort" for c in victim.children)
    while not all(r.done for r in reqs):
        eng.step()
    assert all(r.finish_reason == "length" for r in reqs if r is not victim)
    check_pool(llm)
