"""The canonical quantized weight layout and the affine rounding every op reference shares.

Canonical, kernel-neutral layouts (what an artifact stores):
  * int4: ``qweight`` uint8 ``[N, K // 2]``, two values per byte, column ``2j`` in the low
    nibble and ``2j + 1`` in the high one, offset-binary (stored ``q + 8``, ``q`` in [-8, 7]);
  * int8: ``qweight`` int8 ``[N, K]``;
  * ``scales`` ``[N, K // group_size]`` in the model's float dtype (per-channel: one group);
  * ``zeros`` int8 ``[N, K // group_size]``, signed, in ``q``'s domain, or ``None`` (symmetric).
Dequantization is always ``w = (q - zero) * scale``.
"""
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor


class QuantizedWeight(NamedTuple):
    qweight: Tensor
    scales: Tensor
    zeros: Optional[Tensor]


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def compute_qparams(w: Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Round-to-nearest scales (and integer zero points) per group of ``group_size`` input channels.

    Symmetric: ``scale = absmax / ((qmax - qmin) / 2)`` (absmax/7.5 for int4, the same
    choice as llm-compressor; values at +absmax clip to qmax). Asymmetric: the range is
    widened to include 0 so that 0 stays exact, ``scale = (max - min) / (qmax - qmin)``
    and ``zero = qmin - round(min / scale)``."""
    lo, hi = group_range(w, group_size)
    return range_qparams(lo, hi, bits, symmetric)


def group_range(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Per-group ``(min, max)`` of ``w [N, K]``, widened to include 0: two ``[N, K // group_size]``."""
    N, K = w.shape
    assert K % group_size == 0, f"group_size {group_size} does not divide K={K}"
    wg = w.detach().float().reshape(N, K // group_size, group_size)
    return wg.amin(-1).clamp(max=0.0), wg.amax(-1).clamp(min=0.0)


def range_qparams(lo: Tensor, hi: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Optional[Tensor]]:
    qmin, qmax = qrange(bits)
    eps = torch.finfo(torch.float32).tiny
    if symmetric:
        return (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp_min(eps), None
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
    return scale, range_zero(lo, scale, bits)


def range_zero(lo: Tensor, scale: Tensor, bits: int) -> Tensor:
    """The integer zero point that maps a group's minimum ``lo`` (≤ 0) to ``qmin`` at ``scale``."""
    qmin, qmax = qrange(bits)
    return (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int8)


def quantize(w: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, group_size: int) -> Tensor:
    """Signed integer codes ``clamp(round(w / scale) + zero, qmin, qmax)`` as int8 ``[N, K]``."""
    N, K = w.shape
    qmin, qmax = qrange(bits)
    wg = w.detach().float().reshape(N, K // group_size, group_size)
    q = torch.round(wg / scales.float().unsqueeze(-1))
    if zeros is not None:
        q = q + zeros.float().unsqueeze(-1)
    return q.clamp(qmin, qmax).to(torch.int8).reshape(N, K)


def pack_int4(q: Tensor) -> Tensor:
    """int8 codes in [-8, 7], ``[N, K]`` (K even) -> uint8 ``[N, K // 2]`` (offset-binary nibbles)."""
    assert q.dtype == torch.int8 and q.shape[-1] % 2 == 0, f"need int8 [N, even K], got {q.dtype} {tuple(q.shape)}"
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 ``[N, K // 2]`` -> int8 codes in [-8, 7], ``[N, K]``."""
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_weight(w: Tensor, bits: int, group_size: Optional[int], symmetric: bool,
                    qparams: Optional[tuple[Tensor, Optional[Tensor]]] = None) -> QuantizedWeight:
    """Round-to-nearest quantization of a linear weight ``[N, K]`` into the canonical layout.
    ``group_size=None`` means one group per output channel (per-channel); ``qparams``: the groups'
    ``(scales, zeros)`` when the caller chose them (a range search), else ``compute_qparams``'s."""
    assert bits in (4, 8), f"bits must be 4 or 8, got {bits}"
    G = group_size or w.shape[1]
    scales, zeros = qparams if qparams is not None else compute_qparams(w, bits, G, symmetric)
    q = quantize(w, scales, zeros, bits, G)
    qweight = pack_int4(q) if bits == 4 else q
    return QuantizedWeight(qweight, scales.to(w.dtype), zeros)


def dequantize_weight_ref(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int) -> Tensor:
    """Canonical layout -> float weight ``[N, K]`` in ``scales.dtype``: ``(q - zero) * scale``."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    N, K = q.shape
    ngroups = scales.shape[-1]
    qg = q.reshape(N, ngroups, K // ngroups).float()
    if zeros is not None:
        qg = qg - zeros.float().unsqueeze(-1)
    return (qg * scales.float().unsqueeze(-1)).reshape(N, K).to(scales.dtype)


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(‖ref‖² / ‖ref − approx‖²), the sums as fp32
    dot products; the noise is floored at 1e-30 of the signal, so equal tensors give 300."""
    ref, approx = ref.detach().float().reshape(-1), approx.detach().float().reshape(-1)
    diff = ref - approx
    signal, noise = float(torch.dot(ref, ref)), float(torch.dot(diff, diff))
    return 10 * math.log10(max(signal, 1e-300) / max(noise, signal * 1e-30, 1e-300))
