"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds;
the requests of a step are sampled together (``sample_batch``)."""
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..codegen import cpu_native


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0     # 0: greedy
    top_k: int = 0               # 0: off
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    n: int = 1                   # completions per prompt: forks share the prompt's KV blocks

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str) else self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))


NUCLEUS_LEVELS = (1e-2, 1e-4, 1e-7, 0.0)  # top-p sorts the tokens at least this fraction as likely as the best


def sample(logits: torch.Tensor, p: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """One token from ``logits [V]``."""
    if p.temperature == 0:
        return int(logits.argmax())
    return sample_batch(logits[None], [p], [generator])[0]


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[Optional[torch.Generator]]) -> list[int]:
    """One token per row of ``logits [S, V]`` (temperature > 0), batched where the work is: not
    a softmax, sort and ``multinomial`` per request, but inverse-CDF sampling from
    ``sampling_probs`` with one uniform draw per row from the row's own generator (the global
    one when ``None``). On the CPU, once the native kernels are built, ``qc_cpu::sample_rows``
    does it all in a few passes per row."""
    u = torch.stack([torch.rand((), generator=g) for g in generators])
    if logits.device.type == "cpu" and cpu_native.built():
        return torch.ops.qc_cpu.sample_rows(
            logits.float().contiguous(), torch.tensor([p.temperature for p in params], dtype=torch.float32),
            torch.tensor([p.top_k for p in params]), torch.tensor([p.top_p for p in params], dtype=torch.float32),
            u).tolist()
    probs = sampling_probs(logits, params)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp(max=probs.shape[1] - 1)
    toks = idx.flatten().tolist()
    # u * total may round up to total and land past the last token with mass: step back to it
    for i in (probs.gather(1, idx).flatten() == 0).nonzero().flatten().tolist():
        toks[i] = int(probs[i].nonzero()[-1])
    return toks


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """``[S, V]`` probabilities: temperature, then top-k (ties with the k-th logit kept), then
    top-p (the smallest set of most likely tokens whose mass reaches ``top_p``; ties with its least
    likely member kept; the rest zeroed, not renormalized)."""
    S, V = logits.shape
    x = logits.float() / torch.tensor([p.temperature for p in params])[:, None]
    top_k = torch.tensor([p.top_k or V for p in params]).clamp(max=V)
    rows = (top_k < V).nonzero().flatten()
    best_k = {}  # row -> its top-k logits' indices, most likely first
    if len(rows):
        every = len(rows) == S
        xs, k = (x, top_k) if every else (x[rows], top_k[rows])
        cand = torch.topk(xs, int(k.max()), -1)
        xs = xs.masked_fill(xs < cand.values.gather(1, (k - 1)[:, None]), float("-inf"))
        if every:
            x = xs
        else:
            x[rows] = xs
        best_k = {r: cand.indices[j, :int(k[j])] for j, r in enumerate(rows.tolist())}
    probs = torch.softmax(x, -1)
    for i, p in enumerate(params):
        if p.top_p < 1:
            probs[i] = _nucleus(probs[i], p.top_p, best_k.get(i))
    return probs


def _nucleus(probs: torch.Tensor, top_p: float, best: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One row's top-p. The nucleus is a prefix of the tokens sorted by probability: after top-k,
    of the k tokens top-k kept (``best``, in order; ties with the k-th, left out there, stay in
    through the threshold); otherwise it is found among the tokens above a fraction of the most
    likely one's probability once their mass reaches ``top_p``: a sort of tens to thousands of
    tokens, not of the whole vocabulary."""
    if best is not None:
        sorted_p = probs[best]
        mass = sorted_p.cumsum(-1)
    else:
        top = float(probs.max())
        for level in NUCLEUS_LEVELS:
            head = probs[probs >= top * level] if level else probs
            if level and float(head.sum()) < top_p:
                continue
            sorted_p = head.sort(descending=True).values
            mass = sorted_p.cumsum(-1)
            if not level or float(mass[-1]) >= top_p:
                break
    n = max(1, int((mass - sorted_p < top_p).sum()))  # tokens before which the mass is short of top_p
    return probs.masked_fill(probs < sorted_p[n - 1], 0.0)


def sampling_probs_ref(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """``sampling_probs`` for one row ``[V]``, normalized, by full sorts."""
    x = logits.float() / p.temperature
    if p.top_k:
        kth = x.sort(descending=True).values[min(p.top_k, len(x)) - 1]
        x = torch.where(x < kth, float("-inf"), x)
    probs = torch.softmax(x, -1)
    if p.top_p < 1:
        sorted_p = probs.sort(descending=True).values
        n = int((sorted_p.cumsum(-1) - sorted_p < p.top_p).sum())  # tokens before which the mass is short of top_p
        probs = torch.where(probs < sorted_p[n - 1], 0.0, probs)
    return probs / probs.sum()

