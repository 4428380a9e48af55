"""GGUF input checked against llama.cpp, the reference reader of the format.

A GGUF file is read by transformers (weights dequantized to float, tokenizer converted from the
file's ``tokenizer.ggml.*`` metadata). Two things can go wrong without an error: the converted
tokenizer can split text differently from llama.cpp (a SentencePiece vocabulary whose merges are
lost tokenizes character by character), and the float model can miss a convention of the file.
So, once per file:

* **tokenizer**: a sample text is tokenized by transformers' tokenizer and by llama.cpp from the
  same file (``vocab_only``). Where they differ, a tokenizer is built from the metadata with the
  ``tokenizers`` library (:func:`tokenizer_from_metadata`) and compared the same way; if that
  differs too, :class:`GGUFError` refuses the file in one line.
* **float model**: its next-token logits on the sample's first tokens against llama.cpp's on the
  same tokens: the argmax must agree on at least ``MIN_ARGMAX_AGREEMENT`` of the positions and the
  two perplexities be within ``MAX_PPL_RATIO`` of each other (llama.cpp runs the file's quantized
  weights and quantizes activations; the float model dequantizes the same weights).

llama.cpp comes from ``llama-cpp-python``. Without it the tokenizer is checked against the
metadata build alone, and a disagreement between the two is refused just the same."""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np

# what the tokenizers are compared on: prose, contractions, digits, runs of spaces, tabs and
# newlines, code, accents, other scripts, an emoji (byte fallback)
SAMPLE_TEXT = (
    "The quick brown fox doesn't jump; it's 3.14159 times lazier than 1,234,567 dogs.\n\n"
    "  Two spaces,\tone tab,   three spaces and a trailing space \n"
    "def square(x: int) -> int:\n    return x ** 2  # 100% sure?\n"
    "Naïve café déjà vu — «quoted» Ünïcödé; Ελληνικά, русский, 日本語のテキスト, 한국어 🙂!\n"
    "HTML <b>bold</b> & URLs: https://example.org/a_b?c=d#e. The end.")
MIN_ARGMAX_AGREEMENT = 0.8
MAX_PPL_RATIO = 1.25
LOGIT_CHECK_TOKENS = 64


class GGUFError(ValueError):
    """A GGUF file this tool would read wrongly: refused, in one line."""


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _llama(path: Path, **kw):
    from llama_cpp import Llama
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # llama.cpp's load log
        llm = Llama(model_path=str(path), verbose=False, **kw)
    try:
        yield llm
    finally:
        llm.close()


def llama_cpp_tokens(path: Path, text: str) -> list[int]:
    """llama.cpp's tokens for ``text`` (no BOS, special-token text not parsed) from the file's vocabulary."""
    with _llama(path, vocab_only=True) as llm:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits ``[len(tokens), vocab]`` for ``tokens`` as one sequence, on as many
    threads as torch has (at most 4)."""
    import torch
    with _llama(path, n_ctx=max(64, len(tokens) + 8), n_batch=max(64, len(tokens)), logits_all=True,
                n_threads=max(1, min(4, torch.get_num_threads()))) as llm:
        llm.eval(tokens)
        return np.array(llm.scores[:len(tokens)], dtype=np.float32)


def metadata(path: Path) -> dict:
    """The file's ``tokenizer.ggml.*`` fields as Python values (prefix dropped), and its chat template."""
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") or key == "tokenizer.chat_template":
            out[key.removeprefix("tokenizer.ggml.").removeprefix("tokenizer.")] = field.contents()
    return out


# llama.cpp's pre-tokenizer splits per ``tokenizer.ggml.pre`` (llama-vocab.cpp), applied in order,
# each splitting the pieces of the last; pre-types not listed here are not built
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), [_LLAMA3]),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan"), [_QWEN2]),
    **dict.fromkeys(("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais"), [_GPT2]),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
                    [r"\p{N}", _GPT2]),
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
}
CONTROL, BYTE = 3, 6  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)


def tokenizer_from_metadata(path: Path):
    """A ``PreTrainedTokenizerFast`` built from the file's tokenizer metadata as llama.cpp reads it:
    SentencePiece-style (``model == "llama"``: merges ranked by the merged piece's score, byte
    fallback, ``▁`` for spaces) or GPT-2 BPE (``model == "gpt2"``: the listed merges, byte-level,
    llama.cpp's pre-tokenizer splits). None for other vocabularies and unknown pre-tokenizers."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    meta = metadata(path)
    kind, tokens = meta.get("model"), list(meta.get("tokens") or [])
    types = list(meta.get("token_type") or [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "llama":
        scores = list(meta.get("scores") or [0.0] * len(tokens))
        merges = []
        for tok, score in zip(tokens, scores):
            for cut in range(1, len(tok)):
                left, right = tok[:cut], tok[cut:]
                if left in vocab and right in vocab:
                    merges.append((score, vocab[left], vocab[right], left, right))
        merges.sort(key=lambda m: (-m[0], m[1], m[2]))
        unk = meta.get("unknown_token_id")
        tok = Tokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], fuse_unk=True, byte_fallback=True,
                                   unk_token=tokens[unk] if unk is not None else None))
        steps = [normalizers.Prepend("▁")] if meta.get("add_space_prefix", True) else []
        tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if meta.get("add_space_prefix", True) else []))
    elif kind == "gpt2":
        splits = PRE_SPLITS.get(meta.get("pre", "default"))
        if splits is None or "merges" not in meta:
            return None
        merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
        tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    else:
        return None
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
    tok.add_special_tokens(special)
    named = {k: tokens[meta[f"{k}_token_id"]] for k in ("bos", "eos", "unknown", "padding")
             if isinstance(meta.get(f"{k}_token_id"), int) and 0 <= meta[f"{k}_token_id"] < len(tokens)}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=named.get("bos"), eos_token=named.get("eos"),
                                   unk_token=named.get("unknown"), pad_token=named.get("padding"),
                                   clean_up_tokenization_spaces=False)  # llama.cpp detokenizes without it
    fast.chat_template = meta.get("chat_template")
    return fast


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_tokenizer(path: Path, tokenizer, text: str = SAMPLE_TEXT):
    """The tokenizer to store for this file and what the check found: ``tokenizer`` when it
    tokenizes ``text`` as the reference does (llama.cpp, else the metadata build), else the
    metadata build when that does. Raises :class:`GGUFError` when neither does."""
    ours = tokenizer.encode(text, add_special_tokens=False) if tokenizer is not None else None
    built = None
    if llama_cpp_available():
        ref, reference = llama_cpp_tokens(path, text), "llama.cpp"
    else:
        built = tokenizer_from_metadata(path)
        if built is None:
            raise GGUFError(f"{path}: cannot check this GGUF's tokenizer: llama.cpp is not installed (pip install "
                            "llama-cpp-python) and its vocabulary is not one this tool builds")
        ref, reference = built.encode(text, add_special_tokens=False), "the GGUF metadata"
    report = {"reference": reference, "sample_chars": len(text), "sample_tokens": len(ref)}
    if ours == ref:
        return tokenizer, {**report, "tokenizer": "transformers"}
    built = built or tokenizer_from_metadata(path)
    if built is not None and built.encode(text, add_special_tokens=False) == ref:
        return built, {**report, "tokenizer": "gguf metadata",
                       "transformers_differs_at": _first_difference(ours or [], ref)}
    i = _first_difference(ours or [], ref)
    raise GGUFError(f"{path}: transformers tokenizes this GGUF's text differently from {reference} (token {i} of "
                    f"{len(ref)}: {(ours or [])[i:i + 3]} vs {ref[i:i + 3]}) and a tokenizer built from its metadata "
                    f"{'differs too' if built is not None else 'is not supported'}: refusing to compile a wrong tokenizer")


def check_logits(path: Path, model, tokens: list[int]) -> Optional[dict]:
    """The float model's logits on ``tokens`` against llama.cpp's: next-token argmax agreement and the
    perplexity ratio (ours / llama.cpp's). None without llama.cpp. Raises :class:`GGUFError` outside
    the bounds."""
    if not llama_cpp_available():
        return None
    import torch
    tokens = tokens[:LOGIT_CHECK_TOKENS]
    ref = torch.from_numpy(llama_cpp_logits(path, tokens))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), position_ids=torch.arange(len(tokens))[None])
        ours = getattr(out, "logits", out)[0].float()
    target = torch.tensor(tokens[1:])

    def ppl(logits):
        return math.exp(float(torch.nn.functional.cross_entropy(logits[:-1], target)))
    agree = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    ratio = ppl(ours) / ppl(ref)
    found = {"tokens": len(tokens), "argmax_agreement": round(agree, 4), "ppl_ratio": round(ratio, 4)}
    if agree < MIN_ARGMAX_AGREEMENT or not (1 / MAX_PPL_RATIO <= ratio <= MAX_PPL_RATIO):
        raise GGUFError(f"{path}: the float model transformers reads from this GGUF disagrees with llama.cpp on the "
                        f"same {len(tokens)} tokens (next-token argmax agrees on {agree:.0%}, perplexity ratio "
                        f"{ratio:.2f}): a convention of the file is lost; refusing")
    return found
