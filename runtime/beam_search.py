"""Beam search with transformers' semantics (``generate(num_beams=k, do_sample=False)``), one
prompt's state: its live beams, their cumulative log-probs and the finished hypotheses.

Each step takes the best ``keep = max(2, 1 + #stop tokens) * k`` continuations over all live beams
by cumulative log-prob (float32, as transformers sums them). Of those, a continuation that stops
(EOS or a stop token unless ``ignore_eos``, a stop string, the length limit) becomes a hypothesis
only when it ranks among the first ``k``, scored ``cum_logprob / generated_length ** length_penalty``;
the best ``k`` that do not stop are the next live beams. The search ends when every continuation
stops, when ``k`` hypotheses exist and ``early_stopping`` is True, or when transformers' heuristic
says no live beam can beat the worst hypothesis any more.

The engine (``runtime.engine``) owns the beams' sequences: a surviving beam that continues another
shares its blocks (fork, copy-on-write), a dropped beam returns its blocks at once."""
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from .request import Request
from .sampling import SamplingParams
from .sequence import Sequence, Status


@dataclass
class BeamSearchParams:
    beam_width: int = 4
    max_tokens: int = 16
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False  # True, False or "never", as transformers defines them
    ignore_eos: bool = False
    stop: Union[str, tuple[str, ...]] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if isinstance(self.beam_width, bool) or not isinstance(self.beam_width, int) or self.beam_width < 1:
            raise ValueError(f"beam_width must be an integer >= 1, got {self.beam_width!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids or ())


@dataclass
class BeamSequence:
    """A finished hypothesis: its generated tokens (the stop token included), their summed
    log-prob, its length-penalized ``score`` (the order of ``BeamSearchOutput.sequences``)."""
    token_ids: list[int]
    cum_logprob: float
    score: float
    finish_reason: str  # "stop" | "length"
    text: str = ""


# a continuation's stop check: (live beam index, token, generated length with it) -> reason or None
StopCheck = Callable[[int, int, int], Optional[str]]


class BeamState:
    """The search over one prompt, independent of where the beams' KV lives."""

    def __init__(self, params: BeamSearchParams, num_stop_tokens: int):
        self.params = params
        self.keep = max(2, 1 + num_stop_tokens) * params.beam_width
        self.cum = torch.zeros(1)              # float32, one per live beam, best first
        self.generated = 0                     # tokens each live beam has generated
        self.hypotheses: list[tuple[float, int, list, float, str]] = []  # (score, order, ...): best k
        self._order = 0
        self.improvable = True                 # transformers' early-stop heuristic, not yet satisfied
        self.done = False

    def _finalize(self, score: float, tokens: list[int], cum: float, reason: str) -> None:
        self.hypotheses.append((score, self._order, tokens, cum, reason))
        self._order += 1
        self.hypotheses.sort(key=lambda h: (-h[0], h[1]))
        del self.hypotheses[self.params.beam_width:]

    def step(self, logprobs: torch.Tensor, history: list[list[int]], stops: StopCheck) -> list[tuple[int, int]]:
        """``logprobs[i]``: live beam ``i``'s next-token log-probs (float32), ``history[i]`` its
        generated tokens. Returns the next live beams as (parent beam index, token), best first;
        empty once the search is done."""
        k, lp = self.params.beam_width, self.params.length_penalty
        acc = (logprobs.float() + self.cum[:, None]).flatten()
        top, idx = acc.topk(min(self.keep, acc.numel()))
        vocab = logprobs.shape[1]
        gen = self.generated + 1
        cands = [(i // vocab, i % vocab) for i in idx.tolist()]
        reasons = [stops(b, t, gen) for b, t in cands]
        full = len(self.hypotheses) == k
        if self.improvable and not (full and self.params.early_stopping is True):
            scores = (top / gen ** lp).tolist()
            for j in range(min(k, len(cands))):
                if reasons[j]:
                    b, t = cands[j]
                    self._finalize(scores[j], history[b] + [t], float(top[j]), reasons[j])
        running = [j for j, r in enumerate(reasons) if r is None][:k]
        self.generated = gen
        self.cum = top[running]
        if running and len(self.hypotheses) == k:
            best_len = self.params.max_tokens if self.params.early_stopping == "never" and lp > 0 else gen
            best = self.cum[:1] / best_len ** lp
            worst = torch.tensor([self.hypotheses[-1][0]], dtype=torch.float32)
            self.improvable = self.improvable and bool(best > worst)
        self.done = (not running or not self.improvable
                     or (self.params.early_stopping is True and len(self.hypotheses) == k))
        return [] if self.done else [cands[j] for j in running]

    def sequences(self) -> list[BeamSequence]:
        return [BeamSequence(list(t), cum, score, reason) for score, _, t, cum, reason in self.hypotheses]


@dataclass
class BeamGroup:
    """One prompt's beam search in the engine: ``beams[i]`` is live beam ``i`` of ``state``;
    ``rows`` holds each beam's logits row until every live beam has one (a beam preempted or
    left out of a step catches up first). ``sequences``: the hypotheses, best first, once done."""
    prompt_ids: list[int]
    params: BeamSearchParams
    state: BeamState
    stop_ids: frozenset = frozenset()  # tokens that end a hypothesis: stop_token_ids, and EOS unless ignored
    beams: list[Request] = field(default_factory=list)
    rows: dict = field(default_factory=dict)
    sequences: list[BeamSequence] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" when the search ended, "abort", "error"
    error: Optional[str] = None
    num_cached_tokens: int = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def ready(self) -> bool:
        return all(b.seq.seq_id in self.rows and b.seq.status is Status.RUNNING
                   and b.seq.num_computed_tokens == len(b.seq) for b in self.beams)


class BeamSearching:
    """The engine's beam search (mixed into ``runtime.engine.Engine``, whose state it uses)."""

    def add_beam_search(self, prompt_ids: list[int], params: BeamSearchParams) -> BeamGroup:
        """A beam search over ``prompt_ids`` (``runtime.beam_search``): one sequence until the
        prompt's logits, then up to ``beam_width`` live beams that share blocks. A search whose beams
        could not all fit the pool, sharing only the prompt's full blocks, ends at once with ``error``."""
        if not prompt_ids:
            raise ValueError("empty prompt: at least one token is needed")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this artifact has none")
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos))
        g = BeamGroup(list(prompt_ids), params, BeamState(params, len(stops)), stops)
        bs, n = self.bm.block_size, len(prompt_ids)
        need = n // bs + params.beam_width * self.bm.blocks_needed(n % bs + params.max_tokens) + 1
        if need > self.bm.pool.num_blocks:
            g.finish_reason = "error"
            g.error = (f"a beam search of width {params.beam_width} over this prompt may need {need} KV blocks; the "
                       f"pool has {self.bm.pool.num_blocks}: raise the KV cache budget, or lower beam_width or max_tokens")
            return g
        root = Request(Sequence(prompt_ids), SamplingParams(max_tokens=params.max_tokens, temperature=0.0), None,
                       group=g)
        g.beams = [root]
        self.requests[root.seq.seq_id] = root
        self.groups[id(g)] = g
        self.scheduler.add(root.seq)
        return g

    def _beam_step(self, g: BeamGroup) -> None:
        """Moves ``g`` on by one token: continuations picked over all live beams' rows; a beam
        continued by several new beams is forked (its blocks shared), one continued by none is
        dropped and returns its blocks."""
        beams, p = g.beams, g.params
        if g.state.generated == 0:
            g.num_cached_tokens = beams[0].num_cached_tokens
        rows = torch.stack([g.rows.pop(b.seq.seq_id) for b in beams]).log_softmax(-1)
        history = [b.seq.completion_token_ids for b in beams]
        n_prompt = len(g.prompt_ids)

        def stops(i: int, tok: int, generated: int) -> Optional[str]:
            if tok in g.stop_ids or (p.stop and self._hits_stop(history[i], tok, p.stop)):
                return "stop"
            if generated >= p.max_tokens or n_prompt + generated >= self.max_model_len:
                return "length"
            return None
        nxt = g.state.step(rows, history, stops)
        new, kept = [], set()
        for i, tok in nxt:  # forks first: each copies its parent's tokens before the parent's next one
            if i in kept:
                new.append((self._fork_beam(beams[i]), tok))
            else:
                kept.add(i)
                new.append((beams[i], tok))
        for i, b in enumerate(beams):
            if i not in kept:
                self._end_beam(b)
        for r, tok in new:
            r.seq.token_ids.append(tok)
        g.beams = [r for r, _ in new]
        if g.state.done:
            g.sequences = g.state.sequences()
            for s in g.sequences:
                s.text = self._beam_text(s.token_ids, p.stop)
            g.finish_reason = "stop"
            del self.groups[id(g)]

    def _fork_beam(self, parent: Request) -> Request:
        child = Request(Sequence(list(parent.seq.token_ids), parent.seq.num_prompt_tokens), parent.params, None,
                        num_cached_tokens=parent.num_cached_tokens, group=parent.group)
        self.bm.fork(parent.seq, child.seq)
        self.scheduler.adopt(child.seq)
        self.requests[child.seq.seq_id] = child
        return child

    def _end_beam(self, b: Request) -> None:
        """A beam leaves: its blocks go back at once (those shared stay with their other holders)."""
        if b.seq.status is Status.RUNNING:
            self.scheduler.finish(b.seq, cache=False)
        else:
            self.scheduler.drop_waiting(b.seq)
        self.requests.pop(b.seq.seq_id, None)
        b.group.rows.pop(b.seq.seq_id, None)

    def _hits_stop(self, completion: list[int], tok: int, stop: tuple[str, ...]) -> bool:
        """Whether ``completion + [tok]`` holds a stop string. A live beam's tokens hold none, so a
        new one ends at ``tok``: only the tail that can reach it is decoded (a token adds at least
        a byte; a character takes at most four)."""
        reach = 4 * max(len(s) for s in stop) + 4
        text = self.detokenize(completion[-reach:] + [tok])
        return any(s in text for s in stop)

    def _beam_text(self, ids: list[int], stop: tuple[str, ...]) -> str:
        if self.tokenizer is None:
            return ""
        text = self.detokenize(ids)
        return text[:min((text.find(s) for s in stop if s in text), default=len(text))]

    def _count_beam_blocks(self) -> None:
        if self.groups:
            held, unshared = self._beam_blocks()
            self.beam_block_steps[0] += held
            self.beam_block_steps[1] += unshared

    def _beam_blocks(self) -> tuple[int, int]:
        """Blocks the live beams hold (a shared block once) and would hold if none were shared."""
        tables = [b.seq.block_table for g in self.groups.values() for b in g.beams]
        return len({blk for t in tables for blk in t}), sum(map(len, tables))

    def beam_stats(self) -> dict:
        """Beam search's KV sharing: blocks the live beams hold now and would hold unshared; the
        fraction of block-steps sharing saved over every step a beam search ran so far."""
        held, unshared = self._beam_blocks()
        total_held, total_unshared = self.beam_block_steps
        return {"beam_blocks_held": held, "beam_blocks_unshared": unshared,
                "beam_kv_saved": 1 - total_held / total_unshared if total_unshared else 0.0}
