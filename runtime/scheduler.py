"""Continuous batching: each step packs running sequences' next tokens and waiting prompts
(chunked to a token budget) into one flat batch; when blocks run out, the newest running
sequence is preempted and later recomputed."""
from collections import deque
from typing import NamedTuple

from .block_manager import BlockManager, CopyOp
from .sequence import Sequence, Status


class ScheduledSeq(NamedTuple):
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from seq.num_computed_tokens on


class Schedule(NamedTuple):
    seqs: list[ScheduledSeq]
    copies: list[CopyOp]
    rejected: list[Sequence]  # can never fit the KV pool
    admitted: list[Sequence]  # joined the running batch in this step


class Scheduler:
    def __init__(self, bm: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm, self.max_num_seqs, self.max_tokens = bm, max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.deallocate(seq)  # its computed blocks stay in the prefix cache
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> Schedule:
        budget, out, copies, rejected, admitted = self.max_tokens, [], [], [], []
        start_preemptions = self.num_preemptions
        # running first: a decode token each, or the next chunk of an unfinished prompt
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0:  # preempted earlier in this loop
                continue
            if seq.num_computed_tokens == len(seq):  # a beam waiting for its search's other beams
                continue
            while not self.bm.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            copies += self.bm.may_append(seq)
            n = min(len(seq) - seq.num_computed_tokens, budget)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        # then waiting prompts, in arrival order, while blocks and budget last (none right after a
        # preemption); a prompt that will share more of a prompt being prefilled now than the cache
        # holds waits until those blocks are cached (SGLang's in-batch prefix check)
        preempted = self.num_preemptions > start_preemptions
        deferred: list[Sequence] = []
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.bm.blocks_needed(len(seq) + 1) > self.bm.pool.num_blocks:
                rejected.append(self.waiting.popleft())
                continue
            if self._shares_uncached_prefix(seq):
                deferred.append(self.waiting.popleft())
                continue
            if not self.bm.can_allocate(seq):
                break
            self.waiting.popleft()
            self.bm.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            admitted.append(seq)
            n = min(len(seq) - seq.num_computed_tokens, budget)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))  # first again, in their order
        return Schedule(out, copies, rejected, admitted)

    def _shares_uncached_prefix(self, seq: Sequence) -> bool:
        """True if ``seq``'s prompt starts with more whole blocks of a running, still prefilling
        prompt than the prefix cache holds for it: admitted a step or a chunk later, it reuses
        them instead of computing them a second time."""
        if not self.bm.cache:
            return False
        bs, cached = self.bm.block_size, self.bm.cached_prefix_tokens(seq)
        limit = len(seq) - 1  # the last prompt token is always computed
        for other in self.running:
            if other.num_computed_tokens >= other.num_prompt_tokens:
                continue
            n = cached + bs
            if n <= min(limit, other.num_prompt_tokens) and seq.token_ids[:n] == other.token_ids[:n]:
                return True
        return False

    def adopt(self, seq: Sequence) -> None:
        """A forked sequence that already holds its blocks joins the running batch."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def drop_waiting(self, seq: Sequence) -> None:
        """A waiting sequence leaves the queue (it holds no blocks: a preempted one gave them back)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def finish(self, seq: Sequence, cache: bool = True) -> None:
        """``cache``: its computed full blocks enter the prefix cache (False for a dropped beam)."""
        self.running.remove(seq)
        seq.status = Status.FINISHED
        self.bm.deallocate(seq, cache)
