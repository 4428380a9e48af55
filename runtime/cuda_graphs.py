"""Decode steps replayed from CUDA graphs, as vLLM does: one graph per padded batch size.

A decode step of a small model is mostly launch overhead: hundreds of kernels of a few
microseconds each, every one launched from Python. A graph captured once per batch size
replays them with one call. Inputs live in static buffers; a step of ``S`` sequences runs the
graph of the smallest captured size ``B >= S`` with ``B - S`` padding rows, which write no KV
(slot -1) and attend to one cached token of block 0; their logits are dropped. Block tables
are padded to a fixed width (the most blocks a sequence can hold), so one graph serves a
sequence at any length."""
from typing import Callable

import torch

from .step_inputs import StepInputs

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, program: Callable, kv_cache: torch.Tensor, max_batch: int, max_blocks: int):
        self.program, self.kv_cache, self.max_blocks = program, kv_cache, max_blocks
        self.sizes = [b for b in BATCH_SIZES if b < max_batch] + [max_batch]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def fits(self, inp: StepInputs) -> bool:
        return inp.is_decode and inp.seq_lens.shape[0] <= self.sizes[-1] and inp.block_tables.shape[1] <= self.max_blocks

    def _static_inputs(self, B: int) -> tuple:
        d = self.kv_cache.device
        long = dict(dtype=torch.long, device=d)
        return (torch.zeros(B, **long), torch.zeros(B, **long), self.kv_cache, torch.full((B,), -1, **long),
                torch.zeros(B, self.max_blocks, **long), torch.ones(B, **long), torch.arange(B + 1, **long),
                torch.arange(B, **long))

    def _capture(self, B: int):
        static = self._static_inputs(B)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():  # warm-up: compiles and autotunes outside the capture
            for _ in range(2):
                self.program(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
            out = self.program(*static)
        return graph, static, out

    def run(self, inp: StepInputs) -> torch.Tensor:
        S = inp.seq_lens.shape[0]
        B = next(b for b in self.sizes if b >= S)
        if B not in self.graphs:
            self.graphs[B] = self._capture(B)
        graph, (ids, pos, _, slots, tables, lens, _, _), out = self.graphs[B]
        d = ids.device
        ids[:S].copy_(inp.input_ids, non_blocking=True)
        pos[:S].copy_(inp.positions, non_blocking=True)
        slots[:S].copy_(inp.slot_mapping, non_blocking=True)
        slots[S:].fill_(-1)
        tables.zero_()
        tables[:S, : inp.block_tables.shape[1]].copy_(inp.block_tables.to(d, non_blocking=True))
        lens[:S].copy_(inp.seq_lens, non_blocking=True)
        lens[S:].fill_(1)
        graph.replay()
        return out[:S]
