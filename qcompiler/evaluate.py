"""Perplexity on an evaluation text (by default the bundled one, ``data.britannica_text``):
the first ``windows × window_len`` tokens, non-overlapping windows, each evaluated alone,
PPL = exp(total NLL / total predicted tokens)."""
import math
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # ids[T], positions[T] -> logits[T, V]


def eval_tokens(tokenizer, text: str, num_tokens: int) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if ids.numel() < num_tokens:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than the {num_tokens} asked for")
    return ids[:num_tokens]


def perplexity(fn: LogitsFn, tokens: torch.Tensor, window_len: int, progress: bool = False, desc: str = "eval") -> float:
    windows = tokens.numel() // window_len
    assert windows >= 1 and window_len >= 2, f"need at least one window of >= 2 tokens, got {tokens.numel()} tokens"
    nll, count = 0.0, 0
    pos = torch.arange(window_len)
    with torch.no_grad():
        for i in tqdm(range(windows), desc=desc, disable=None if progress else True, unit="window"):
            w = tokens[i * window_len:(i + 1) * window_len]
            logits = fn(w, pos)
            nll += F.cross_entropy(logits[:-1].float(), w[1:].to(logits.device), reduction="sum").item()
            count += window_len - 1
    return math.exp(nll / count)
