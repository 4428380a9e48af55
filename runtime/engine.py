"""The engine: one step = schedule -> run the paged program -> sample and postprocess."""
from typing import Optional

import torch

from qcompiler.codegen.attention import is_quantized, new_kv_cache
from qcompiler.codegen.workspace import SplitKWorkspace

from .beam_search import BeamGroup, BeamSearching
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer, decode
from .request import Request
from .sampling import SamplingParams, process_logits, sample_batch, top_logprobs
from .scheduler import Scheduler
from .sequence import Sequence, Status
from .step_inputs import step_inputs


class ModelRunner:
    """Owns the KV cache and the split-K workspace (``workspace``: the one given, else its own) and
    runs the program on a step's packed tokens, in that workspace. On CUDA, decode steps of up to
    ``cuda_graph_max_batch`` sequences replay CUDA graphs (``runtime.cuda_graphs``), captured in the
    same workspace; 0 turns that off."""

    def __init__(self, program, paged: dict, dtype: torch.dtype, num_blocks: int, block_size: int,
                 device: torch.device = torch.device("cpu"), cuda_graph_max_batch: int = 0,
                 max_blocks_per_seq: int = 0, workspace: Optional[SplitKWorkspace] = None):
        self.program, self.block_size = program, block_size
        self.workspace = workspace if workspace is not None else SplitKWorkspace()
        self.kv_cache = new_kv_cache(paged["num_layers"], num_blocks, block_size, paged["num_kv_heads"],
                                     paged["head_dim"], dtype, device)
        self.graphs = None
        if cuda_graph_max_batch and self.kv_cache.is_cuda:
            from .cuda_graphs import DecodeGraphs
            self.graphs = DecodeGraphs(program, self.kv_cache, cuda_graph_max_batch,
                                       max_blocks_per_seq or num_blocks, self.workspace)

    def run(self, inp) -> torch.Tensor:
        if self.graphs is not None and self.graphs.fits(inp):
            return self.graphs.run(inp)
        with self.workspace, torch.no_grad():
            return self.program(*inp.args(self.kv_cache))

    def copy_blocks(self, copies) -> None:
        cache = self.kv_cache.view(torch.uint8) if is_quantized(self.kv_cache) else self.kv_cache
        for src, dst in copies:  # a quantized block's rows carry their scales
            cache[:, :, dst] = cache[:, :, src]


class Engine(BeamSearching):
    def __init__(self, runner: ModelRunner, num_blocks: int, block_size: int, tokenizer=None,
                 eos_token_ids: tuple[int, ...] = (), prefix_cache: bool = True, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, max_model_len: int = 1 << 30):
        self.runner, self.tokenizer, self.eos = runner, tokenizer, set(eos_token_ids)
        self.max_model_len = max_model_len
        self.bm = BlockManager(num_blocks, block_size, prefix_cache)
        self.scheduler = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens)
        self.requests: dict[int, Request] = {}
        self.groups: dict[int, BeamGroup] = {}  # live beam searches, by id
        self.prompt_tokens = self.cached_tokens = 0
        self.beam_block_steps = [0, 0]  # over steps with live beams: blocks they held, blocks unshared beams would

    def add_request(self, prompt_ids: list[int], params: SamplingParams, detokenize: bool = False) -> Request:
        """``detokenize``: keep the request's text up to date as tokens come (``req.detok``);
        requests with stop strings always do."""
        if not prompt_ids:
            raise ValueError("empty prompt: at least one token is needed")
        if (params.stop or detokenize) and self.tokenizer is None:
            raise ValueError("stop strings and streamed text need a tokenizer; this artifact has none")
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        req = Request(Sequence(prompt_ids, use_prefix_cache=params.prompt_logprobs is None), params, gen,
                      detok=self._detokenizer(params, detokenize))
        if params.prompt_logprobs is not None:
            req.prompt_logprobs.append(None)
        self.requests[req.seq.seq_id] = req
        self.scheduler.add(req.seq)
        return req

    def step(self) -> list[Request]:
        """Runs one step; returns the requests that finished in it."""
        sched = self.scheduler.schedule()
        finished = []
        for seq in sched.rejected:
            req = self.requests.pop(seq.seq_id)
            req.finish_reason = "error"
            req.error = (f"the request needs {self.bm.blocks_needed(len(seq) + 1)} KV blocks; the pool has "
                         f"{self.bm.pool.num_blocks}: raise the KV cache budget or shorten the prompt")
            if req.group is not None:
                self.abort(req.group)
                req.group.finish_reason, req.group.error, req = "error", req.error, req.group
            finished.append(req)
        if not sched.seqs:
            return finished
        self.runner.copy_blocks(sched.copies)
        for seq in sched.admitted:
            self.prompt_tokens += len(seq)
            self.cached_tokens += seq.num_cached_tokens
            self.requests[seq.seq_id].num_cached_tokens = seq.num_cached_tokens
        every = [self.requests[s.seq.seq_id].params.prompt_logprobs is not None
                 and s.seq.num_computed_tokens < s.seq.num_prompt_tokens for s in sched.seqs]
        inp = step_inputs([s.seq.block_table for s in sched.seqs], [s.seq.num_computed_tokens for s in sched.seqs],
                          [s.seq.token_ids[s.seq.num_computed_tokens:s.seq.num_computed_tokens + s.num_new_tokens]
                           for s in sched.seqs], self.bm.block_size, every)
        logits = self.runner.run(inp)  # [N, V]: each sequence's last row (every row of those ``every`` flags)
        last, row, searches = [], 0, {}  # each sequence's last row in ``logits``; beam searches with rows
        draws = []  # (logits row, request) for every request that gets a token now, forks included
        for i, s in enumerate(sched.seqs):
            seq = s.seq
            if every[i]:
                self._prompt_logprobs(self.requests[seq.seq_id], logits[row:row + s.num_new_tokens],
                                      seq.num_computed_tokens)
                row += s.num_new_tokens - 1
            last.append(row)
            row += 1
            prompt_chunk = seq.num_computed_tokens < seq.num_prompt_tokens
            seq.num_computed_tokens += s.num_new_tokens
            if prompt_chunk:
                self.bm.cache_prefix(seq)  # later requests with this prefix share it at once
            if seq.num_computed_tokens < len(seq):
                continue  # a prompt chunk: nothing to sample yet
            req = self.requests[seq.seq_id]
            if req.group is not None:  # the search moves on once every live beam has its row
                req.group.rows[seq.seq_id] = logits[last[i]].to(torch.float32, copy=True)
                searches[id(req.group)] = req.group
                continue
            draws += [(last[i], r) for r in [req] + self._fork(req)]
        tokens = self._sample(logits, draws) if draws else []
        for (_, r), tok in zip(draws, tokens):
            r.seq.token_ids.append(tok)
            reason = self._finish_reason(r, tok)
            if reason:
                r.finish_reason = reason
                if r.detok is not None:
                    r.text = r.detok.finish()
                self.scheduler.finish(r.seq)
                finished.append(self.requests.pop(r.seq.seq_id))
        for g in searches.values():
            if g.ready():
                self._beam_step(g)
                if g.done:
                    finished.append(g)
        self._count_beam_blocks()
        return finished

    def _sample(self, logits: torch.Tensor, draws: list) -> list[int]:
        """One token per draw ``(logits row, request)``: the row after the request's logit
        processors, greedy or sampled; log-probs (of the raw row, as vLLM reports them) when asked."""
        rows = [i for i, _ in draws]
        proc = [j for j, (_, r) in enumerate(draws) if r.params.processes_logits]
        x = logits if rows == list(range(len(logits))) and not proc else logits[rows]
        if proc:
            x = x.float()
            for j in proc:
                r = draws[j][1]
                process_logits(x[j], r.params, r.seq.token_ids[:r.seq.num_prompt_tokens],
                               r.seq.completion_token_ids, tuple(self.eos))
        tokens = [0] * len(draws)
        if any(r.params.temperature == 0 for _, r in draws):
            tokens = x.max(-1).indices.tolist()  # one call for every greedy request (max: faster than argmax on the CPU)
        sampled = [j for j, (_, r) in enumerate(draws) if r.params.temperature > 0]
        if sampled:  # one batch on the CPU: each request draws from its own generator
            picked = (x if len(sampled) == len(x) else x[sampled]).float().cpu()
            for j, tok in zip(sampled, sample_batch(picked, [draws[j][1].params for j in sampled],
                                                    [draws[j][1].generator for j in sampled])):
                tokens[j] = tok
        want = [j for j, (_, r) in enumerate(draws) if r.params.logprobs is not None]
        if want:
            lps = top_logprobs(logits[[draws[j][0] for j in want]].cpu(), [tokens[j] for j in want],
                               [draws[j][1].params.logprobs for j in want])
            for j, lp in zip(want, lps):
                draws[j][1].logprobs.append(lp)
        return tokens

    def _prompt_logprobs(self, req: Request, rows: torch.Tensor, start: int) -> None:
        """Row ``j`` of a prompt chunk from position ``start`` predicts prompt token ``start + j + 1``;
        positions already recorded (a chunk computed again after a preemption) are skipped."""
        seq = req.seq
        first, end = max(start + 1, len(req.prompt_logprobs)), min(start + rows.shape[0] + 1, seq.num_prompt_tokens)
        if first < end:
            req.prompt_logprobs += top_logprobs(rows[first - start - 1:end - start - 1].cpu(), seq.token_ids[first:end],
                                                [req.params.prompt_logprobs] * (end - first))

    def abort(self, req: Request) -> None:
        """Ends ``req`` (and its forks) wherever it is: waiting, prefilling or decoding. Its blocks
        return at once (computed full blocks to the prefix cache, unlocked); ``finish_reason`` is
        "abort". A request already finished is left as it is."""
        if isinstance(req, BeamGroup):
            if not req.done:
                for b in req.beams:
                    self._end_beam(b)
                req.beams, req.finish_reason, req.sequences = [], "abort", req.state.sequences()
                self.groups.pop(id(req), None)
            return
        for r in [req, *req.children]:
            if r.finish_reason is not None:
                continue
            seq = r.seq
            if seq.status is Status.RUNNING:
                self.scheduler.finish(seq)
            else:
                self.scheduler.drop_waiting(seq)
            r.finish_reason = "abort"
            if r.detok is not None:
                r.text = r.detok.finish()
            self.requests.pop(seq.seq_id, None)

    def _fork(self, req: Request) -> list[Request]:
        """At a request's first token, its other ``n - 1`` completions: sequences sharing every
        prompt block (copy-on-write), each drawing its own first token from the same logits."""
        if req.forked or req.params.n == 1:
            return []
        req.forked = True
        for _ in range(req.params.n - 1):
            child = Request(Sequence(list(req.seq.token_ids), req.seq.num_prompt_tokens), req.params,
                            req.generator, num_cached_tokens=req.num_cached_tokens, forked=True,
                            detok=self._detokenizer(req.params, req.detok is not None))
            self.bm.fork(req.seq, child.seq)
            self.scheduler.adopt(child.seq)
            self.requests[child.seq.seq_id] = child
            req.children.append(child)
        return req.children

    def _finish_reason(self, req: Request, tok: int) -> Optional[str]:
        p, seq = req.params, req.seq
        stop_string = req.detok is not None and req.detok.add(tok)  # the text then ends before it
        if stop_string or tok in p.stop_token_ids or (tok in self.eos and not p.ignore_eos):
            return "stop"
        if seq.num_completion_tokens >= p.max_tokens:
            return "length"
        if len(seq) >= self.max_model_len:
            return "length"
        return None

    def _detokenizer(self, params: SamplingParams, detokenize: bool) -> Optional[IncrementalDetokenizer]:
        return IncrementalDetokenizer(self.tokenizer, params.stop) if params.stop or detokenize else None

    def detokenize(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids)

    def stats(self) -> dict:
        bm = self.bm
        return {"blocks_total": bm.pool.num_blocks, "blocks_free": bm.num_free, "blocks_cached": bm.num_cached,
                "prefix_cache_hit_rate": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
                "num_preemptions": self.scheduler.num_preemptions,
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                **bm.slot_usage(self.scheduler.running), **self.beam_stats()}
