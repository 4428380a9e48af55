"""The KV pool's size on a GPU from a fraction of the device's memory, as vLLM's
``gpu_memory_utilization`` sets it: what is left of ``utilization x total`` once the weights,
the activation peak of the largest step and memory held outside torch's allocator are counted.

The peak comes from one profiling step of ``max_num_batched_tokens`` tokens in one sequence
(prompt attention over its own blocks, logits for as many rows as a step may sample), run before
the pool exists. It includes the profiling step's own KV blocks, which are freed with it, so
they are taken back out. The decode graphs, captured later, and the sampler's buffers are not
counted: they come out of what ``1 - utilization`` leaves (decode steps are at most
``max_num_seqs`` tokens, and the graphs share one memory pool)."""
import ctypes
import ctypes.util
from functools import lru_cache
from typing import NamedTuple, Optional

import torch

from .step_inputs import single_sequence


@lru_cache(maxsize=1)
def glibc() -> Optional[ctypes.CDLL]:
    """The process's C library where it is glibc (it has ``malloc_trim`` and ``mallopt``: the host
    heap's policy), else None: the allocator's own policy stands."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


class MemoryProfile(NamedTuple):
    total: int    # the device's memory
    others: int   # held outside torch's allocator: the CUDA context, other processes
    peak: int     # torch's peak allocation over the profiling step: weights, activations, its KV blocks
    step_kv: int  # the profiling step's own KV blocks (part of ``peak``, freed after it)


def kv_cache_bytes(p: MemoryProfile, utilization: float) -> int:
    """Bytes the KV pool may take: ``utilization`` of the device, less what the weights and the
    largest step's activations (``peak - step_kv``) and memory outside torch (``others``) hold."""
    return int(p.total * utilization) - p.others - (p.peak - p.step_kv)


def profile_step(program, paged: dict, dtype: torch.dtype, device: torch.device, num_tokens: int,
                 num_logits: int, block_size: int) -> MemoryProfile:
    """Runs the program once on a prompt of ``num_tokens`` tokens with logits for its last
    ``num_logits`` rows, and measures the device's memory around it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    args = list(single_sequence(ids, torch.arange(num_tokens, device=device), paged, dtype, block_size))
    args[-1] = args[-1][num_tokens - num_logits:]  # logits_indices: the rows a step samples
    step_kv = args[2].numel() * args[2].element_size()
    with torch.no_grad():
        program(*args)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del args
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return MemoryProfile(total, total - free - torch.cuda.memory_reserved(device), peak, step_kv)
