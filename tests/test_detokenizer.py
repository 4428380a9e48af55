"""Incremental detokenization against decoding the whole completion at once, on the bundled
SmolLM2 tokenizer (byte-level BPE: multi-byte characters span tokens), and stop strings through
the engine: the text ends before the stop string, the stream never releases what it cuts."""
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler import LLM, SamplingParams
from qcompiler.compiler import compile_model
from qcompiler.models import load_source
from qcompiler.runtime.detokenizer import IncrementalDetokenizer, decode
from qcompiler.targets import Float
from test_engine import check_pool, greedy_ref
from tests_paths import EXAMPLES, FIXTURES

TEXT = ("The café's naïve señor — 東京 and Ελλάδα 🙂🎉 — said: \"Hello,  world!\"\n\n"
        "Shakespeare wrote 37 plays…  ")


@pytest.fixture(scope="module")
def tokenizer():
    sys.path.insert(0, str(EXAMPLES))
    import smollm2
    return smollm2.build_tokenizer()


def run(tok, ids, stop=()):
    """Feeds ids one at a time; returns the detokenizer, the tokens it took and its stable texts."""
    d, stables = IncrementalDetokenizer(tok, stop), []
    for k, t in enumerate(ids, 1):
        if d.add(t):
            return d, k, stables
        stables.append(d.stable)
    d.finish()
    return d, len(ids), stables


@settings(max_examples=60)
@given(st.data())
def test_incremental_text_equals_whole_decode(tokenizer, data):
    ids = tokenizer(TEXT)["input_ids"]
    vocab = len(tokenizer)
    # a slice of real text (it may start or end inside a character), or arbitrary ids
    if data.draw(st.booleans()):
        a = data.draw(st.integers(0, len(ids) - 1))
        ids = ids[a:data.draw(st.integers(a + 1, len(ids)))]
    else:
        ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=24))
    d, _, stables = run(tokenizer, ids)
    assert d.text == decode(tokenizer, ids)
    assert all(s == d.text[:len(s)] for s in stables)  # released text is never taken back


@settings(max_examples=40)
@given(st.data())
def test_stop_string_cuts_the_text_at_its_first_occurrence(tokenizer, data):
    ids = tokenizer(TEXT)["input_ids"]
    full = decode(tokenizer, ids)
    a = data.draw(st.integers(0, len(full) - 1))
    stop = full[a:a + data.draw(st.integers(1, 6))]
    other = data.draw(st.sampled_from(["\x00never", "zzzz"]))
    d, k, stables = run(tokenizer, ids, (other, stop))
    assert d.stopped and d.text == full[:full.index(stop)]
    assert stop in decode(tokenizer, ids[:k])        # it stopped on a token that completed the stop string
    first = next(j for j in range(1, len(ids) + 1) if stop in decode(tokenizer, ids[:j]))
    assert k >= first                                # never early; later only while a character is incomplete
    assert all(s == d.text[:len(s)] for s in stables)
    assert all(stop not in s for s in stables)


class CharTokenizer:
    """One letter per token id: enough to test stop strings through the engine."""
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_engine_stop_strings_and_streaming(tmp_path_factory):
    src = load_source(str(FIXTURES / "plain_lm.py"))
    out = tmp_path_factory.mktemp("detok") / "plain-float"
    compile_model(src, Float(), out)
    llm = LLM(out, block_size=4)
    with pytest.raises(ValueError, match="need a tokenizer"):
        llm.generate([[1, 2, 3]], SamplingParams(stop=("ab",)))
    llm.tokenizer = llm.engine.tokenizer = CharTokenizer()
    prompt = [5, 17, 3, 9, 30]
    ref = CharTokenizer().decode(greedy_ref(src.model, prompt, 16))
    stop = ref[6:8]
    cut = ref.index(stop)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop=(stop, "#"))
    o = llm.generate([prompt], params)[0]
    assert o.finish_reason == "stop" and o.text == ref[:cut]
    assert len(o.token_ids) == cut + len(stop)       # the token that completed the stop string is the last
    pieces = list(llm.stream(prompt, params))
    assert "".join(pieces) == ref[:cut] and all(p for p in pieces)
    # no stop string in the text: every token's text, finish by length
    o = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, stop=("#",)))[0]
    assert o.finish_reason == "length" and o.text == ref[:5]
    check_pool(llm)


def test_a_bpe_tokenizer_saved_with_cleanup_loads_quietly_and_decodes_alike(tokenizer, tmp_path):
    """A byte-level BPE tokenizer whose config asks for WordPiece space cleanup (as SmolLM2's does)
    loads without transformers' warning on each decode, and decodes the same text."""
    import logging

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from qcompiler.models import load_tokenizer
    tokenizer.save_pretrained(tmp_path)
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace('"clean_up_tokenization_spaces": false',
                                           '"clean_up_tokenization_spaces": true'))
    plain = AutoTokenizer.from_pretrained(tmp_path)
    assert plain.clean_up_tokenization_spaces
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log = hf_logging.get_logger("transformers.tokenization_utils_tokenizers")
    handler = Keep()
    log.addHandler(handler)
    warned = lambda: [m for m in seen if "clean_up_tokenization_spaces" in m]  # noqa: E731
    try:
        ids = tokenizer(TEXT + " Hello , world . It 's").input_ids
        hf_logging.warning_once.cache_clear()  # transformers warns once a process
        loud = plain.decode(ids)
        assert warned()
        seen.clear()
        hf_logging.warning_once.cache_clear()
        quiet = load_tokenizer(tmp_path).decode(ids)
        assert not warned()
        assert quiet == loud == tokenizer.decode(ids)
    finally:
        log.removeHandler(handler)
