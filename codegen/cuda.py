"""Load-time lowering for CUDA: the canonical weight-only linears keep their op (its CUDA kernel
is the Triton GEMM of ``codegen.triton_linear``), with two changes made once here:

* siblings that read one input with one scheme (q/k/v, gate/up) become one call on their
  concatenated weight, then a split: one launch instead of three, and a wider N that fills the
  GPU at decode sizes (rows quantize independently, so this is exact);
* scales and zero points are stored N-contiguous (same shape ``[N, K/G]``, strides ``(1, N)``):
  the kernel reads one group's scales for a tile of N outputs as one coalesced row.
"""
import functools

import torch
from torch.fx import GraphModule, Node

from .cpu import lower_linears, sibling_key
from .fx import insert_call

qc = torch.ops.qc


DEFAULT_NUM_SMS = 132  # what the kernels' heuristics assume off the GPU (the interpreter): a Hopper card


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device``, asked once: it shapes the kernels' tile and split choices,
    never their results."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code (``triton.cdiv`` is a JIT function: costly to call from Python)."""
    return -(-a // b)


def pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def pow2_ceil(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def pow2_divisor(n: int) -> int:
    """The largest power of two dividing ``n``: a BLOCK_K (a power of two, as ``tl.arange`` wants)
    that divides a group of any size, 32 for a group of 96."""
    return n & -n


def n_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t [N, G]`` with the same shape and values, laid out column-major (strides ``(1, N)``)."""
    return t.t().contiguous().t()


def _emit_cuda(gm, put, x, bits, qweight, scales, zeros, bias) -> Node:
    op = qc.w4a16_linear.default if bits == 4 else qc.w8a16_linear.default
    zeros = None if zeros is None else n_contiguous(zeros)
    return insert_call(gm, op, (x, put("qweight", qweight), put("scales", n_contiguous(scales)),
                                put("zeros", zeros), put("bias", bias)))


def lower_for_cuda(gm: GraphModule, merge: bool = True) -> GraphModule:
    """Merges sibling weight-only linears and lays their scales out N-contiguous. Outputs equal
    the canonical program's (the same op, the same values)."""
    return lower_linears(gm, sibling_key, _emit_cuda, merge)
