"""The split-K workspace of the Triton GEMMs, owned by whoever runs the program.

Split over K, the programs of one output tile add their fp32 sums into a workspace and count
themselves in the tile's lock (``triton_linear_common._write_out``). The GEMM is a ``qc::`` op
called from an exported (and maybe CUDA-graph-captured) program, so the workspace cannot be an
argument of its own: the runner of the program enters a ``SplitKWorkspace`` around each call,
and the op's wrapper takes the buffers of the innermost one entered in the calling thread.

    ws = SplitKWorkspace()          # one per runner, kept as long as the runner
    with ws:
        logits = program(*args)     # split-K GEMMs inside use ws's buffers

Invariants:
  * buffers are zero between calls: the last split of each tile clears what it used;
  * one owner runs its calls one at a time, in stream order (two runners that may run at the
    same time own two workspaces): calls share the buffers, never concurrently;
  * a CUDA graph captured inside ``with ws`` keeps pointers into ws's buffers; ws keeps every
    buffer it has handed out alive (outgrown ones too), so it must live as long as those graphs;
  * outside any workspace, a call gets zero-filled buffers of its own (correct, one memset more).
"""
from contextvars import ContextVar
from typing import Optional

import torch
from torch import Tensor

from .cuda import pow2_ceil

Buffers = tuple[Tensor, Tensor]  # (fp32 sums, int32 tile locks), both zero between calls

_ACTIVE: ContextVar[tuple["SplitKWorkspace", ...]] = ContextVar("split_k_workspaces", default=())


def _zeros(device: torch.device, numel: int, tiles: int) -> Buffers:
    return (torch.zeros(numel, device=device, dtype=torch.float32),
            torch.zeros(tiles, device=device, dtype=torch.int32))


class SplitKWorkspace:
    """Split-K sums and tile locks per device, grown (to powers of two) when a call needs more."""

    def __init__(self):
        self.buffers: dict[torch.device, Buffers] = {}
        self.retired: list[Buffers] = []  # outgrown buffers: graphs captured earlier still write to them

    def __enter__(self) -> "SplitKWorkspace":
        _ACTIVE.set(_ACTIVE.get() + (self,))
        return self

    def __exit__(self, *exc) -> None:
        stack = _ACTIVE.get()
        assert stack and stack[-1] is self, "SplitKWorkspace exited out of order"
        _ACTIVE.set(stack[:-1])

    def get(self, device: torch.device, numel: int, tiles: int) -> Buffers:
        """At least ``numel`` sums and ``tiles`` locks on ``device``. Growth during a CUDA graph
        capture makes buffers for that graph alone (zero-filled by the graph itself, from its
        memory pool), leaving the held ones as they are."""
        cur = self.buffers.get(device)
        if cur is not None and cur[0].numel() >= numel and cur[1].numel() >= tiles:
            return cur
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return _zeros(device, numel, tiles)
        held = (cur[0].numel(), cur[1].numel()) if cur is not None else (0, 0)
        new = _zeros(device, pow2_ceil(max(numel, held[0])), pow2_ceil(max(tiles, held[1])))
        if cur is not None:
            self.retired.append(cur)
        self.buffers[device] = new
        return new


def active_workspace() -> Optional[SplitKWorkspace]:
    """The innermost ``SplitKWorkspace`` entered in this thread, or None."""
    stack = _ACTIVE.get()
    return stack[-1] if stack else None


def split_workspace(device: torch.device, numel: int, tiles: int) -> Buffers:
    """The buffers a split-K call uses: the active workspace's, else zero-filled ones of its own."""
    ws = active_workspace()
    return ws.get(device, numel, tiles) if ws is not None else _zeros(device, numel, tiles)
