"""AWQ's scale search: the per-input-channel scale ``s`` that, folded into a group of linears
(``passes.smooth.awq``), makes their RTN-quantized weights lose the least output."""
from typing import Optional

import torch
from torch import Tensor

from .rounding import fake_quantize


def weight_mean(w: Tensor, group_size: Optional[int]) -> Tensor:
    """AWQ's per-input-channel weight magnitude: |w| relative to its group's max, averaged over rows."""
    N, K = w.shape
    G = group_size or K
    wg = w.abs().reshape(N, K // G, G)
    return (wg / (wg.amax(-1, keepdim=True) + 1e-6)).reshape(N, K).mean(0)


def awq_scales(x: Tensor, w: Tensor, bits: int, group_size: Optional[int], symmetric: bool,
               n_grid: int = 20, duo_scaling: bool = True, rows: int = 2048) -> tuple[Tensor, float, float]:
    """The per-channel scale minimizing ``‖x Q(W·s)/s ᵀ − x Wᵀ‖²`` over the grid
    ``s = mean|x|^r / mean|W|^(1−r)``, ``r = 0, 1/n_grid, …``; returns (s, r, its error).
    The error is measured on at most ``rows`` rows of ``x``, drawn with a fixed seed."""
    x_mean = x.abs().mean(0)
    w_mean = weight_mean(w, group_size)
    sub = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:rows]]
    ref = sub @ w.t()
    best = (torch.ones_like(x_mean), 0.0, float("inf"))
    for i in range(n_grid):
        r = i / n_grid
        s = x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4) if duo_scaling else x_mean.pow(r)
        s = s.clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = float((sub @ (fake_quantize(w * s, bits, group_size, symmetric) / s).t() - ref).pow(2).mean())
        if err < best[2]:
            best = (s, r, err)
    return best
