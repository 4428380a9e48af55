"""The engine loop: one thread owns the engine and runs its steps; HTTP handlers (on the asyncio
event loop) submit and abort requests through a queue and receive each step's new tokens through
``asyncio`` queues, so neither side ever waits on the other.

Invariants: only the loop thread touches the engine; a request leaves ``active`` exactly once, with
a final ``done`` event; an aborted request's blocks are back in the pool (or, when full and
computed, unlocked in the prefix cache) before its ``done`` event is posted."""
import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Union

from qcompiler.runtime.beam_search import BeamGroup, BeamSearchParams
from qcompiler.runtime.engine import Engine, Request
from qcompiler.runtime.memory import glibc
from qcompiler.runtime.sequence import Sequence
from qcompiler.runtime.sampling import SamplingParams


TRIM_EVERY_S = 2.0  # how often the loop hands freed heap memory back, while it works or idles


@dataclass
class ChoiceDelta:
    index: int                   # the completion's index among the request's n
    token_ids: list[int]         # generated since the last delta
    text: str                    # text released since the last delta
    logprobs: list               # log-prob entries since the last delta
    finish_reason: Optional[str] = None


@dataclass
class Handle:
    """One prompt of an HTTP request, as the event loop sees it. Events on ``queue``:
    ``(tag, "delta", [ChoiceDelta])`` and finally ``(tag, "done", Handle)``."""
    prompt_ids: list[int]
    params: Union[SamplingParams, BeamSearchParams]
    aloop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    tag: int = 0                                  # which prompt of the HTTP request
    prompt_text: Optional[str] = None             # the prompt as the client sent it, when text
    req: Union[Request, BeamGroup, None] = None   # set by the loop thread
    cancelled: bool = False
    error: Optional[str] = None
    arrival: float = field(default_factory=time.monotonic)
    admitted: Optional[float] = None
    first_token: Optional[float] = None
    last_token: Optional[float] = None
    sent: dict = field(default_factory=dict)      # choice index -> [tokens, chars, logprobs sent, finished sent]

    def post(self, kind: str, payload) -> None:
        self.aloop.call_soon_threadsafe(self.queue.put_nowait, (self.tag, kind, payload))

    def choices(self) -> list[Request]:
        """The request's completions; a beam search's hypotheses, best first, once it is done."""
        if isinstance(self.req, BeamGroup):
            return [Request(Sequence(self.prompt_ids + s.token_ids, len(self.prompt_ids)), self.params, None,
                            finish_reason=s.finish_reason, text=s.text) for s in self.req.sequences]
        return [self.req, *self.req.children] if self.req is not None else []

    def started(self) -> bool:
        if isinstance(self.req, BeamGroup):
            return self.req.state.generated > 0 or self.req.done
        return self.req.seq.num_computed_tokens > 0


class EngineLoop:
    """Runs ``engine`` on a thread of its own. ``metrics`` (``server.metrics.Metrics``) observes
    latencies and finished requests; ``snapshot`` is the engine's state after the last step."""

    def __init__(self, engine: Engine, metrics=None, idle_wait: float = 0.05):
        self.engine, self.metrics, self.idle_wait = engine, metrics, idle_wait
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.active: dict[int, Handle] = {}
        self.pending = 0  # submitted, not yet seen by the loop thread (both sides change it: under _lock)
        self._lock = threading.Lock()
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.snapshot = self._snapshot()
        self._thread = threading.Thread(target=self._run, name="qcompiler-engine", daemon=True)
        self.failure: Optional[str] = None

    # --- the event loop's side ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def submit(self, handle: Handle) -> None:
        with self._lock:
            self.pending += 1
        self._inbox.put(("add", handle))
        self._wake.set()

    def abort(self, handle: Handle) -> None:
        handle.cancelled = True
        self._inbox.put(("abort", handle))
        self._wake.set()

    def num_waiting(self) -> int:
        return self.snapshot["waiting"] + self.pending

    def stop(self, timeout: float = 5.0) -> None:
        """Waits up to ``timeout`` seconds for running requests to finish, aborts the rest, and
        ends the thread."""
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=max(1.0, timeout))

    # --- the loop thread ------------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        trim, last_trim = getattr(glibc(), "malloc_trim", None), time.monotonic()
        try:
            while not self._stop.is_set():
                self._drain()
                if trim is not None and time.monotonic() - last_trim > TRIM_EVERY_S:
                    trim(0)  # prompts of every length leave freed blocks malloc would keep
                    last_trim = time.monotonic()
                if eng.scheduler.has_work():
                    eng.step()
                    self._publish()
                else:
                    self.snapshot = self._snapshot()
                    self._wake.wait(self.idle_wait)
                    self._wake.clear()
        except Exception as e:  # the engine failed: every open request ends with the reason
            self.failure = f"engine step failed: {type(e).__name__}: {e}"
            for h in list(self.active.values()):
                h.error = self.failure
                self._finish(h)
            raise
        finally:
            self._drain()
            for h in list(self.active.values()):
                self._abort(h)
            self.snapshot = self._snapshot()

    def _drain(self) -> None:
        while True:
            try:
                kind, h = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._lock:
                    self.pending -= 1
                if h.cancelled:
                    h.post("done", h)
                    continue
                try:
                    if isinstance(h.params, BeamSearchParams):
                        h.req = self.engine.add_beam_search(h.prompt_ids, h.params)
                    else:
                        h.req = self.engine.add_request(h.prompt_ids, h.params,
                                                        detokenize=self.engine.tokenizer is not None)
                except ValueError as e:
                    h.error = str(e)
                    h.post("done", h)
                    continue
                if h.req.error:  # a beam search that can never fit the pool
                    h.error = h.req.error
                    h.post("done", h)
                    continue
                self.active[id(h)] = h
            elif id(h) in self.active:
                self._abort(h)

    def _abort(self, h: Handle) -> None:
        self.engine.abort(h.req)
        self._publish_one(h, time.monotonic())

    def _publish(self) -> None:
        now = time.monotonic()
        for h in list(self.active.values()):
            self._publish_one(h, now)
        self.snapshot = self._snapshot()

    def _publish_one(self, h: Handle, now: float) -> None:
        deltas = []
        if h.admitted is None and h.started():
            h.admitted = now
            if self.metrics:
                self.metrics.queue_time.observe(now - h.arrival)
        for i, r in enumerate(h.choices()):
            sent = h.sent.setdefault(i, [0, 0, 0, False])
            toks = r.seq.completion_token_ids[sent[0]:]
            text = r.text if r.finish_reason is not None else (r.detok.stable if r.detok is not None else "")
            new_text, lps = text[sent[1]:], r.logprobs[sent[2]:]
            final = r.finish_reason is not None and not sent[3]
            if not (toks or new_text or lps or final):
                continue
            if i == 0 and toks:
                self._observe_tokens(h, len(toks), now)
            self.generation_tokens += len(toks)
            sent[0] += len(toks)
            sent[1] += len(new_text)
            sent[2] += len(lps)
            sent[3] = sent[3] or final
            deltas.append(ChoiceDelta(i, toks, new_text, lps, r.finish_reason if final else None))
        if deltas:
            h.post("delta", deltas)
        if h.req.done:
            self._finish(h)

    def _observe_tokens(self, h: Handle, n: int, now: float) -> None:
        if self.metrics is None:
            return
        if h.first_token is None:
            h.first_token = now
            self.metrics.ttft.observe(now - h.arrival)
            n -= 1
        elif n:
            for _ in range(n):
                self.metrics.itl.observe((now - h.last_token) / n)
        h.last_token = now

    def _finish(self, h: Handle) -> None:
        self.active.pop(id(h), None)
        if h.req is not None:
            reason = h.req.finish_reason or "error"
            self.finished[reason] = self.finished.get(reason, 0) + 1
            if h.req.error and h.error is None:
                h.error = h.req.error
        if self.metrics:
            self.metrics.e2e.observe(time.monotonic() - h.arrival)
        h.post("done", h)

    def _snapshot(self) -> dict:
        eng = self.engine
        bm, sch = eng.bm, eng.scheduler
        total = bm.pool.num_blocks
        return {"running": len(sch.running), "waiting": len(sch.waiting), "blocks_total": total,
                "blocks_free": bm.num_free, "blocks_cached": bm.num_cached,
                "kv_cache_usage": (total - bm.num_available()) / total if total else 0.0,
                "prompt_tokens": eng.prompt_tokens, "cached_tokens": eng.cached_tokens,
                "preemptions": sch.num_preemptions, "generation_tokens": self.generation_tokens,
                "finished": dict(self.finished), "active": len(self.active)}
