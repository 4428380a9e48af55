"""Decode steps replayed from CUDA graphs, as vLLM does: one graph per padded batch size.

A decode step of a small model is mostly launch overhead: hundreds of kernels of a few
microseconds each, every one launched from Python. A graph captured once per batch size
replays them with one call. A step of ``S`` sequences runs the graph of the smallest captured
size ``B >= S`` with ``B - S`` padding rows, which write no KV (slot -1) and attend to one
cached token; their logits are dropped. Block tables are padded to a fixed width
(the most blocks a sequence can hold), so one graph serves a sequence at any length.

A step sends its integer inputs with one asynchronous copy from a pinned host buffer, filled on
the CPU (``stage_decode``): ids, positions, slots and lengths land where the graph reads them,
and the ``[S, W]`` block tables land in a staging area, from which one device copy puts them
into the first ``W`` columns of the graph's wide table. Columns past a sequence's blocks keep
what earlier steps left there: block ids of this pool, which attention never reads (it stops
at each sequence's length). Two operations per step instead of a copy or fill per input."""
from typing import Callable, NamedTuple, Optional

import torch

from qcompiler.codegen.workspace import SplitKWorkspace

from .step_inputs import StepInputs

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeBuffers(NamedTuple):
    """One flat int64 buffer: the per-row inputs the graph reads (each ``[B]``, starting at a
    multiple of 16 elements, so every view is as aligned as a tensor of its own), then room for
    a step's block tables packed ``[S, W]``."""
    flat: torch.Tensor
    input_ids: torch.Tensor     # [B]
    positions: torch.Tensor     # [B]
    slot_mapping: torch.Tensor  # [B]
    seq_lens: torch.Tensor      # [B]

    @classmethod
    def new(cls, B: int, max_blocks: int, device, pin: bool = False) -> "DecodeBuffers":
        R = _rows(B)
        flat = torch.zeros(4 * R + B * max_blocks, dtype=torch.long, device=device, pin_memory=pin)
        return cls(flat, *(flat[i * R:i * R + B] for i in range(4)))

    def tables(self, S: int, W: int) -> torch.Tensor:
        """The staged block tables of a step of ``S`` sequences, ``W`` blocks wide."""
        R = _rows(self.input_ids.shape[0])
        return self.flat[4 * R:4 * R + S * W].view(S, W)


def _rows(B: int) -> int:
    return -(-B // 16) * 16


def stage_decode(inp: StepInputs, host: DecodeBuffers) -> int:
    """Writes the decode step ``inp`` of ``S`` sequences into ``host`` (``B >= S`` rows); returns
    how many leading elements of ``host.flat`` the step uses. Rows past ``S`` pad: they write no
    KV (slot -1) and read one token (of the block their table's column 0 names)."""
    S, W = inp.block_tables.shape
    R = _rows(host.input_ids.shape[0])
    host.flat[:4 * R].zero_()
    host.input_ids[:S] = inp.input_ids
    host.positions[:S] = inp.positions
    host.slot_mapping[:S] = inp.slot_mapping
    host.slot_mapping[S:] = -1
    host.seq_lens[:S] = inp.seq_lens
    host.seq_lens[S:] = 1
    host.tables(S, W).copy_(inp.block_tables)
    return 4 * R + S * W


def send_decode(host: DecodeBuffers, dev: DecodeBuffers, block_tables: torch.Tensor, S: int, W: int, n: int) -> None:
    """The staged step onto the device: one copy of ``n`` elements, then the tables into the first
    ``W`` columns of the graph's ``block_tables``."""
    dev.flat[:n].copy_(host.flat[:n], non_blocking=True)
    block_tables[:S, :W].copy_(dev.tables(S, W))


class DecodeGraphs:
    """The decode graphs of one program, captured in ``workspace`` (the runner's, else its own):
    the graphs write into its split-K buffers, so it is held here as long as they are."""

    def __init__(self, program: Callable, kv_cache: torch.Tensor, max_batch: int, max_blocks: int,
                 workspace: Optional[SplitKWorkspace] = None):
        self.program, self.kv_cache, self.max_blocks = program, kv_cache, max_blocks
        self.workspace = workspace if workspace is not None else SplitKWorkspace()
        self.sizes = [b for b in BATCH_SIZES if b < max_batch] + [max_batch]
        # per size: the graph, its device buffers, their pinned host copy, its block tables and its logits
        self.graphs: dict[int, tuple] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.sent = torch.cuda.Event()  # the last host-to-device copy: the host copy is rewritten after it

    def fits(self, inp: StepInputs) -> bool:
        return inp.is_decode and inp.seq_lens.shape[0] <= self.sizes[-1] and inp.block_tables.shape[1] <= self.max_blocks

    def _capture(self, B: int):
        d = self.kv_cache.device
        dev, host = DecodeBuffers.new(B, self.max_blocks, d), DecodeBuffers.new(B, self.max_blocks, "cpu", pin=True)
        dev.seq_lens.fill_(1)
        dev.slot_mapping.fill_(-1)
        long = dict(dtype=torch.long, device=d)
        tables = torch.zeros(B, self.max_blocks, **long)
        args = (dev.input_ids, dev.positions, self.kv_cache, dev.slot_mapping, tables, dev.seq_lens,
                torch.arange(B + 1, **long), torch.arange(B, **long))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # warm-up, outside the capture: compiles, autotunes and grows the workspace to what the graph uses
        with self.workspace, torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                self.program(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with self.workspace, torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
            out = self.program(*args)
        return graph, dev, host, tables, out

    def run(self, inp: StepInputs) -> torch.Tensor:
        S, W = inp.block_tables.shape
        B = next(b for b in self.sizes if b >= S)
        if B not in self.graphs:
            self.graphs[B] = self._capture(B)
        graph, dev, host, tables, out = self.graphs[B]
        self.sent.synchronize()  # the previous step's copy has left the pinned buffer
        n = stage_decode(inp, host)
        send_decode(host, dev, tables, S, W, n)
        self.sent.record()
        graph.replay()
        return out[:S]
