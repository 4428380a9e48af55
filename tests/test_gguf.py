"""GGUF input checked against llama.cpp (``qcompiler.gguf``), on tiny GGUF files written here with
each tokenizer style (GPT-2 byte-level BPE, SentencePiece with byte fallback): the artifact's
tokenizer tokenizes text it was not checked on exactly as llama.cpp does; a tokenizer transformers
mis-converts (merges lost: character by character) is replaced by one built from the file's
metadata; a file neither can read is refused in one line, as is a float model whose logits
disagree with llama.cpp's."""
import json

import pytest

from gguf_files import gpt2_vocab, sentencepiece_vocab, tiny_llama, write_gguf
from qcompiler import data, gguf, models
from qcompiler.cli import main
from qcompiler.gguf import GGUFError, check_logits, check_tokenizer, llama_cpp_tokens

HELD_OUT = data.britannica_text()[2000:4000]  # text the compile-time check did not see


@pytest.fixture(scope="module", params=["sentencepiece", "gpt2-bpe"])
def gguf_file(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    vocab = sentencepiece_vocab(tmp) if request.param == "sentencepiece" else gpt2_vocab()
    model = tiny_llama(len(vocab["tokens"]))
    return write_gguf(tmp / f"{request.param}.gguf", model, vocab), model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")


def test_compiled_tokenizer_and_model_agree_with_llama_cpp(gguf_file, cache, tmp_path, capsys):
    path, model = gguf_file
    assert main([str(path), "--target", "float", "-o", str(tmp_path / "art")]) == 0
    assert "tokenizes as llama.cpp does" in capsys.readouterr().out  # the summary says what was checked
    checks = json.loads((tmp_path / "art" / "manifest.json").read_text())["model"]["checks"]
    assert checks["tokenizer"]["reference"] == "llama.cpp" and checks["tokenizer"]["sample_tokens"] > 50
    assert checks["float_logits"]["argmax_agreement"] >= 0.99  # float32 weights: llama.cpp computes the same model
    from transformers import AutoTokenizer
    stored = AutoTokenizer.from_pretrained(tmp_path / "art")
    assert stored.encode(HELD_OUT, add_special_tokens=False) == llama_cpp_tokens(path, HELD_OUT)


def _char_level(tokenizer):
    """What a conversion that lost the merges does: every character its own token."""
    class CharLevel:
        def encode(self, text, add_special_tokens=False):
            return [tokenizer.convert_tokens_to_ids(c) for c in text]
    return CharLevel()


def test_mis_converted_tokenizer_is_rebuilt_from_metadata(gguf_file):
    path, _ = gguf_file
    wrong = _char_level(gguf.tokenizer_from_metadata(path))
    tok, report = check_tokenizer(path, wrong)
    assert report["tokenizer"] == "gguf metadata" and tok is not wrong
    assert tok.encode(HELD_OUT, add_special_tokens=False) == llama_cpp_tokens(path, HELD_OUT)


def test_unreadable_tokenizer_is_refused_in_one_line(gguf_file, monkeypatch):
    path, _ = gguf_file
    wrong = _char_level(gguf.tokenizer_from_metadata(path))
    monkeypatch.setattr(gguf, "tokenizer_from_metadata", lambda p: None)
    with pytest.raises(GGUFError, match="differently from llama.cpp .*refusing") as e:
        check_tokenizer(path, wrong)
    assert len(str(e.value).splitlines()) == 1


def test_float_model_that_disagrees_with_llama_cpp_is_refused(gguf_file):
    path, model = gguf_file
    tokens = llama_cpp_tokens(path, HELD_OUT)
    assert check_logits(path, model, tokens)["argmax_agreement"] >= 0.99
    wrong = tiny_llama(model.config.vocab_size, seed=1)  # another model: a lost convention at its worst
    with pytest.raises(GGUFError, match="disagrees with llama.cpp") as e:
        check_logits(path, wrong, tokens)
    assert len(str(e.value).splitlines()) == 1
