"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seeds;
the requests of a step are sampled together (``sample_batch``). Logit processors (penalties,
biases, ``min_tokens``) change a request's row first (``process_logits``)."""
from dataclasses import dataclass, field
from typing import Optional, Sequence as Seq

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
    min_tokens: int = 0          # EOS and stop_token_ids are blocked until this many tokens are out
    presence_penalty: float = 0.0   # OpenAI's: minus this for every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: minus this times its count in the generated tokens
    repetition_penalty: float = 1.0  # transformers': logits of prompt and generated tokens / p (> 0) or * p
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)  # (token id, added to its logit)
    logprobs: Optional[int] = None         # per generated token: its log-prob and this many top alternatives
    prompt_logprobs: Optional[int] = None  # the same for every prompt token after the first (no prefix cache)

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
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}")
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        object.__setattr__(self, "stop", tuple([self.stop] if isinstance(self.stop, str) else self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def processes_logits(self) -> bool:
        """Whether ``process_logits`` changes this request's logits."""
        return bool(self.min_tokens or self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0)


MAX_LOGPROBS = 20


def process_logits(row: torch.Tensor, p: SamplingParams, prompt: Seq[int], output: Seq[int],
                   eos: Seq[int]) -> torch.Tensor:
    """One request's logits ``[V]`` (fp32, changed in place and returned) after its processors, in
    vLLM's order: ``min_tokens`` (EOS and ``stop_token_ids`` to -inf while fewer tokens are out),
    ``logit_bias``, then the penalties (repetition over prompt and output, transformers' rule;
    presence and frequency over the output, OpenAI's)."""
    V = row.shape[0]
    if len(output) < p.min_tokens:
        blocked = [t for t in (*eos, *p.stop_token_ids) if 0 <= t < V]
        if blocked:
            row[blocked] = float("-inf")
    for t, b in p.logit_bias:
        if 0 <= t < V:
            row[t] += b
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long)
        if seen.numel():
            x = row[seen]
            row[seen] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and output:
        ids, counts = torch.tensor(output, dtype=torch.long).unique(return_counts=True)
        row[ids] -= p.frequency_penalty * counts.float() + p.presence_penalty
    return row


def top_logprobs(logits: torch.Tensor, chosen: Seq[int], k: Seq[int]) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row of ``logits [R, V]``: the log-prob of ``chosen[r]`` under the row's softmax and the
    ``k[r]`` most likely tokens with theirs, most likely first."""
    lp = torch.log_softmax(logits.float(), -1)
    kmax = max(k, default=0)
    top = torch.topk(lp, kmax, -1) if kmax else None
    out = []
    for r, (tok, n) in enumerate(zip(chosen, k)):
        alts = list(zip(top.indices[r, :n].tolist(), top.values[r, :n].tolist())) if n else []
        out.append((float(lp[r, tok]), alts))
    return out


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
    one when ``None``). On the CPU, once the AVX-512 kernels are built, ``qc_cpu::sample_rows``
    does it all in a few passes per row."""
    u = torch.stack([torch.rand((), generator=g) for g in generators])
    if logits.device.type == "cpu" and cpu_native.avx512():
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

