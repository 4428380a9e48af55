"""Calibration data: token samples for the methods that look at activations (GPTQ, AWQ,
SmoothQuant, static activation scales), drawn reproducibly from one seeded token stream.

Sources, first found wins: ``--calib-file`` (UTF-8 text), the model file's
``calibration_data()`` (a list of ``[1, T]`` token-id tensors, for models without a
tokenizer) or its ``calibration_texts()`` (joined with blank lines, tokenized once). From the
token stream, ``random.Random(seed)`` draws ``samples`` starts with ``randrange(N - seq_len + 1)``."""
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch


# Samples a method draws unless told: imatrix needs only each input channel's mean square
DEFAULT_SAMPLES, METHOD_SAMPLES = 64, {"imatrix": 16}


@dataclass(frozen=True)
class CalibrationConfig:
    samples: Optional[int] = None  # None: the method's default (``samples_for``)
    seq_len: int = 512
    seed: int = 0
    file: Optional[str] = None

    def __post_init__(self):
        for name in ("samples", "seq_len"):
            v = getattr(self, name)
            if (v is not None or name == "seq_len") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"calibration {name} must be an integer >= 1, got {v!r}")

    def samples_for(self, method: Optional[str]) -> int:
        return self.samples or METHOD_SAMPLES.get(method, DEFAULT_SAMPLES)


class CalibrationSet(NamedTuple):
    samples: list[torch.Tensor]  # each int64 [T]
    source: str                  # where the tokens came from
    sha256: str                  # of the samples' token ids, in order

    @property
    def num_tokens(self) -> int:
        return sum(s.numel() for s in self.samples)

    def describe(self, cfg: CalibrationConfig) -> dict:
        return {"source": self.source, "samples": len(self.samples), "seq_len": cfg.seq_len, "seed": cfg.seed,
                "tokens": self.num_tokens, "sha256": self.sha256}


def draw_samples(tokens: torch.Tensor, samples: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """``samples`` windows of ``seq_len`` tokens at ``random.Random(seed)``'s starts."""
    N = tokens.numel()
    if N < seq_len:
        raise ValueError(f"calibration text has {N} tokens, fewer than --calib-seq-len {seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(N - seq_len + 1) for _ in range(samples)]
    return [tokens[s:s + seq_len].clone() for s in starts]


def _hash(samples: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _tokenize(tokenizer, text: str, what: str) -> torch.Tensor:
    if tokenizer is None:
        raise ValueError(f"{what} needs a tokenizer, and the model has none: define calibration_data() in the model "
                         "file (a list of [1, T] token-id tensors)")
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def load_calibration(src, cfg: CalibrationConfig, vocab_size: Optional[int] = None,
                     method: Optional[str] = None) -> CalibrationSet:
    """The calibration samples for ``src`` (a ``ModelSource``), as many as ``cfg.samples_for(method)``;
    ``ValueError`` says what is missing."""
    n = cfg.samples_for(method)
    if cfg.file:
        path = Path(cfg.file)
        if not path.is_file():
            raise FileNotFoundError(f"--calib-file {path}: no such file")
        tokens, source = _tokenize(src.tokenizer, path.read_text(encoding="utf-8"), f"--calib-file {path}"), str(path)
        samples = draw_samples(tokens, n, cfg.seq_len, cfg.seed)
    elif src.calibration_data is not None:
        data = list(src.calibration_data())
        if not data or not all(isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == 1 for t in data):
            raise ValueError("calibration_data() must return a non-empty list of [1, T] token-id tensors")
        tokens, source = torch.cat([t[0].long() for t in data]), "calibration_data()"
        samples = draw_samples(tokens, n, min(cfg.seq_len, tokens.numel()), cfg.seed)
    elif src.calibration_texts is not None:
        tokens = _tokenize(src.tokenizer, "\n\n".join(src.calibration_texts()), "calibration_texts()")
        source = "calibration_texts()"
        samples = draw_samples(tokens, n, cfg.seq_len, cfg.seed)
    else:
        raise ValueError("this method needs calibration data: define calibration_texts() or calibration_data() in "
                         "the model file, or pass --calib-file")
    if vocab_size is not None:
        ids = torch.cat(samples)
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.numel():
            raise ValueError(f"calibration token id {int(bad[0])} outside the vocabulary [0, {vocab_size})")
    return CalibrationSet(samples, source, _hash(samples))
