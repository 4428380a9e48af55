"""Beam search: token for token and score for score against transformers' ``generate(num_beams=k)``
on the tiny Llama (stop tokens, length penalties, early stopping), against a textbook beam search
over the eager plain model (no stop token) under chunked prefill, preemption and no prefix cache;
and the KV blocks the beams share: every reference count right at every step, none left after
completion or abort, ordinary requests unchanged beside them. (Float SmolLM2 with its own EOS:
tests/test_smollm2.py.)"""
import pytest
import torch

from qcompiler import LLM, BeamSearchParams, SamplingParams
from qcompiler.compiler import compile_model
from qcompiler.models import load_source
from qcompiler.targets import Float
from test_engine import artifact, check_pool, prompts  # noqa: F401  (artifact: the plain model, compiled)
from tests_paths import EXAMPLES


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    src = load_source(str(EXAMPLES / "tiny_llama.py"))
    out = tmp_path_factory.mktemp("beams") / "tiny-llama-float"
    compile_model(src, Float(), out)
    return out, src.model.eval()


def llama_prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 1024, (n,), generator=g).tolist() for n in (5, 9, 14)]


@pytest.mark.parametrize("k,length_penalty,early_stopping", [
    (2, 1.0, False), (4, 0.6, False), (4, 1.0, True), (3, 2.0, "never"), (1, 1.0, False)])
def test_equals_transformers_generate(llama, k, length_penalty, early_stopping):
    """The stop token of each prompt is one its best beams pick early, so hypotheses end at
    different lengths and the finalization rules decide the output."""
    out, model = llama
    llm = LLM(out, block_size=4, kv_cache_dtype="float32")
    ps = llama_prompts()
    free = llm.beam_search(ps, BeamSearchParams(beam_width=k, max_tokens=8, ignore_eos=True))
    for p, f in zip(ps, free):
        stop = f.sequences[0].token_ids[2]
        params = BeamSearchParams(beam_width=k, max_tokens=8, length_penalty=length_penalty,
                                  early_stopping=early_stopping, ignore_eos=True, stop_token_ids=[stop])
        o = llm.beam_search(p, params)[0]
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), num_beams=k, do_sample=False, max_new_tokens=8,
                                 eos_token_id=stop, pad_token_id=stop, length_penalty=length_penalty,
                                 early_stopping=early_stopping, num_return_sequences=k, output_scores=True,
                                 return_dict_in_generate=True)
        width = ref.sequences.shape[1] - len(p)  # transformers pads shorter hypotheses with the stop token
        assert [s.token_ids + [stop] * (width - len(s.token_ids)) for s in o.sequences] == \
            ref.sequences[:, len(p):].tolist()
        if k > 1:  # width 1 is transformers' greedy search, which reports no scores
            torch.testing.assert_close(torch.tensor([s.score for s in o.sequences]), ref.sequences_scores,
                                       rtol=0, atol=1e-4)
        for s in o.sequences:
            assert s.finish_reason == ("stop" if s.token_ids[-1] == stop else "length")
            assert s.score == pytest.approx(s.cum_logprob / len(s.token_ids) ** length_penalty, rel=1e-5)
    check_pool(llm)


def textbook(model, prompt, k, n):
    """Keeps the ``k`` best of every beam's every continuation, ``n`` times: (tokens, cum log-prob)."""
    beams = [([], 0.0)]
    with torch.no_grad():
        for _ in range(n):
            cands = []
            for toks, cum in beams:
                ids = torch.tensor(prompt + toks)[None]
                lp = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None])[0, -1].float().log_softmax(-1)
                cands += [(toks + [t], cum + float(v)) for t, v in enumerate(lp)]
            beams = sorted(cands, key=lambda c: -c[1])[:k]
    return beams


@pytest.mark.parametrize("kw", [
    dict(),
    dict(max_num_batched_tokens=7),                                # prompts in chunks, beams beside them
    dict(prefix_cache=False),
    dict(num_blocks=16, block_size=4, max_num_batched_tokens=16),  # beams preempted and recomputed
])
def test_equals_a_textbook_beam_search(artifact, kw):
    out, model = artifact
    llm = LLM(out, **{"block_size": 4, **kw})
    ps = prompts(3, seed=7, lo=3, hi=12)
    outs = llm.beam_search(ps, BeamSearchParams(beam_width=4, max_tokens=6, length_penalty=0.5))
    for p, o in zip(ps, outs):
        ref = textbook(model, p, 4, 6)
        assert [s.token_ids for s in o.sequences] == [t for t, _ in ref]
        torch.testing.assert_close(torch.tensor([s.cum_logprob for s in o.sequences]),
                                   torch.tensor([c for _, c in ref]), rtol=0, atol=1e-4)
        assert all(s.finish_reason == "length" for s in o.sequences)
    if "num_blocks" in kw:
        assert llm.stats()["num_preemptions"] > 0
    if not kw:  # the prompt's full blocks went to the radix cache, as any prompt's do
        i = max(range(3), key=lambda j: len(ps[j]))
        again = llm.beam_search(ps[i], BeamSearchParams(beam_width=4, max_tokens=6, length_penalty=0.5))[0]
        assert again.num_cached_tokens == (len(ps[i]) - 1) // 4 * 4 > 0
        assert [s.token_ids for s in again.sequences] == [s.token_ids for s in outs[i].sequences]
    check_pool(llm)


def check_refcounts(llm):
    """Every block's reference count is the number of block tables holding it, plus one if the
    radix cache owns it; a block on the free list has none."""
    eng = llm.engine
    bm = eng.bm
    holders = [0] * bm.pool.num_blocks
    for seq in list(eng.scheduler.running) + list(eng.scheduler.waiting):
        for b in seq.block_table:
            holders[b] += 1
    if bm.cache:
        for node in bm.cache._nodes():
            for b in node.blocks:
                holders[b] += 1
    assert holders == bm.pool.ref
    assert set(bm.pool.free) == {b for b, r in enumerate(bm.pool.ref) if r == 0}


@pytest.mark.parametrize("kw", [dict(), dict(num_blocks=24, max_num_batched_tokens=16)])
def test_beams_share_blocks_beside_ordinary_requests(artifact, kw):
    """Beam searches and sampled requests in the same steps: both give what they give alone; the
    beams hold fewer blocks than unshared beams would, and every count is right at every step."""
    out, _ = artifact
    ps = prompts(2, seed=9, lo=9, hi=14)
    beam = BeamSearchParams(beam_width=4, max_tokens=10)
    sample = SamplingParams(max_tokens=10, temperature=0.8, seed=5, ignore_eos=True)
    alone = LLM(out, block_size=4)
    beams_alone = alone.beam_search(ps, beam)
    samples_alone = alone.generate(ps, sample)

    llm = LLM(out, block_size=4, **kw)
    eng = llm.engine
    groups = [eng.add_beam_search(p, beam) for p in ps]
    reqs = [eng.add_request(p, sample) for p in ps]
    shared = False
    while not all(x.done for x in groups + reqs):
        eng.step()
        check_refcounts(llm)
        st = llm.stats()
        assert st["beam_blocks_held"] <= st["beam_blocks_unshared"]
        shared |= st["beam_blocks_held"] < st["beam_blocks_unshared"]
    assert shared and 0 < llm.stats()["beam_kv_saved"] < 1
    assert [[s.token_ids for s in g.sequences] for g in groups] == \
        [[s.token_ids for s in o.sequences] for o in beams_alone]
    assert [r.seq.completion_token_ids for r in reqs] == [o.token_ids for o in samples_alone]
    check_refcounts(llm)
    check_pool(llm)


@pytest.mark.parametrize("steps", [0, 1, 3, 8])
def test_abort_returns_every_block(artifact, steps):
    out, _ = artifact
    llm = LLM(out, block_size=4, num_blocks=24, max_num_batched_tokens=16)
    eng = llm.engine
    groups = [eng.add_beam_search(p, BeamSearchParams(beam_width=4, max_tokens=10))
              for p in prompts(3, seed=2, lo=6, hi=12)]
    for _ in range(steps):
        eng.step()
    for g in groups:
        eng.abort(g)
        assert g.finish_reason == "abort" and not g.beams
    assert not eng.scheduler.has_work() and not eng.groups
    check_refcounts(llm)
    check_pool(llm)


def test_a_search_that_cannot_fit_and_bad_parameters(artifact):
    out, _ = artifact
    llm = LLM(out, block_size=4, num_blocks=12)
    big, ok = llm.beam_search([list(range(1, 20)), [5, 6, 7]], BeamSearchParams(beam_width=4, max_tokens=4))
    assert big.error and "KV blocks" in big.error and not big.sequences
    assert ok.error is None and len(ok.sequences) == 4
    check_pool(llm)
    for bad in (dict(beam_width=0), dict(max_tokens=0), dict(early_stopping="sometimes")):
        with pytest.raises(ValueError):
            BeamSearchParams(**bad)
    with pytest.raises(ValueError, match="tokenizer"):
        llm.beam_search([[1, 2]], BeamSearchParams(stop="x"))


def test_stop_strings_end_hypotheses(tmp_path):
    """A hypothesis ends at the token that completes a stop string (``finish_reason`` "stop"), its
    text cut before it; the others never hold it."""
    from tests_paths import FIXTURES
    src = load_source(str(FIXTURES / "chat_lm.py"))
    compile_model(src, Float(), tmp_path / "chat", verify=False)
    llm = LLM(tmp_path / "chat")
    prompt = "The quick brown fox"
    free = llm.beam_search(prompt, BeamSearchParams(beam_width=3, max_tokens=12, ignore_eos=True))[0]
    stop = free.sequences[0].text[4:6]
    o = llm.beam_search(prompt, BeamSearchParams(beam_width=3, max_tokens=12, ignore_eos=True, stop=stop))[0]
    assert any(s.finish_reason == "stop" for s in o.sequences)
    for s in o.sequences:
        full = llm.engine.detokenize(s.token_ids)
        if s.finish_reason == "stop":
            assert stop not in llm.engine.detokenize(s.token_ids[:-1]) and s.text == full[:full.index(stop)]
        else:
            assert stop not in full and s.text == full
