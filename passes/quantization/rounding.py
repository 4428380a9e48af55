"""How a weight is rounded at compile time beyond min-max: RTN as the searches score it, and the
per-group clipped-range search (AWQ's clipping, also used by RTN and GPTQ with ``clip``).

Every function returns qparams or weights in the canonical layout's terms (``codegen.quant``), so
what a search picks is stored and read by the kernels unchanged."""
from typing import Optional

import torch
from torch import Tensor

from qcompiler.codegen.quant import compute_qparams, group_range, quantize, range_qparams, range_zero


def fake_quantize(w: Tensor, bits: int, group_size: Optional[int], symmetric: bool) -> Tensor:
    """``dequantize(quantize(w))`` by RTN with min-max qparams, in fp32: what a scale search scores."""
    N, K = w.shape
    G = group_size or K
    scale, zero = compute_qparams(w, bits, G, symmetric)
    q = quantize(w, scale, zero, bits, G).float().reshape(N, K // G, G)
    z = 0.0 if zero is None else zero.float().unsqueeze(-1)
    return ((q - z) * scale.unsqueeze(-1)).reshape(N, K)


def clip_ratios(w: Tensor, bits: int, group_size: int, symmetric: bool, hessian: Optional[Tensor] = None, *,
                grid: int = 20, max_shrink: float = 0.5) -> Tensor:
    """Per group of ``w [N, K]``, the ratio ``p`` (``1, 1 − 1/grid, …, ≥ 1 − max_shrink``) whose clipped
    range ``[p·min, p·max]`` rounds the group with the smallest error: ``[N, K // group_size]``.

    The error is the group's output error ``δ H_gg δᵀ`` (``δ = Q(w) − w`` over the group's input
    channels, ``H_gg`` the diagonal block of the input Hessian ``XᵀX``: AWQ's clipping search,
    scored on every calibration token at once) or, without ``hessian``, ``‖δ‖²`` (weight MSE).
    A range that spans a few outliers clips nothing but spends levels on them; a tighter one
    clips them and resolves everything else finer. Ties keep the wider range (``p = 1`` first)."""
    N, K = w.shape
    G = group_size
    lo, hi = group_range(w, G)
    wg = w.detach().float().reshape(N, K // G, G)
    blocks = None
    if hessian is not None:
        assert hessian.shape == (K, K), f"hessian must be [{K}, {K}], got {tuple(hessian.shape)}"
        idx = torch.arange(K).reshape(K // G, G)
        blocks = hessian.float()[idx.unsqueeze(-1), idx.unsqueeze(-2)]          # [K // G, G, G]
    best_err = best_p = None
    for i in range(int(max_shrink * grid) + 1):
        p = 1.0 - i / grid
        scale, zero = range_qparams(lo * p, hi * p, bits, symmetric)
        q = quantize(w, scale, zero, bits, G).float().reshape(N, K // G, G)
        d = (q - (0.0 if zero is None else zero.float().unsqueeze(-1))) * scale.unsqueeze(-1) - wg
        if blocks is None:
            err = d.square().sum(-1)                                            # [N, K // G]
        else:
            err = (torch.einsum("ngi,gij->ngj", d, blocks) * d).sum(-1)
        if best_err is None:
            best_err, best_p = err, torch.ones_like(err)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_p = torch.where(better, p, best_p)
    return best_p


def search_qparams(w: Tensor, bits: int, group_size: int, symmetric: bool, hessian: Optional[Tensor] = None,
                   **search) -> tuple[Tensor, Optional[Tensor]]:
    """``compute_qparams`` of the clipped ranges ``clip_ratios`` picks: never worse than min-max
    (``p = 1``) by the error it measures."""
    p = clip_ratios(w, bits, group_size, symmetric, hessian, **search)
    lo, hi = group_range(w, group_size)
    return range_qparams(lo * p, hi * p, bits, symmetric)


def clip_weight(w: Tensor, group_size: int, ratios: Tensor) -> Tensor:
    """``w`` clamped per group to ``[p·min, p·max]`` (``ratios`` from ``clip_ratios``): its min-max
    qparams are then the clipped ones, also after its rows are rescaled (a scale folded into them)."""
    N, K = w.shape
    lo, hi = group_range(w, group_size)
    wg = w.reshape(N, K // group_size, group_size)
    out = torch.minimum(torch.maximum(wg.float(), (lo * ratios).unsqueeze(-1)), (hi * ratios).unsqueeze(-1))
    return out.reshape(N, K).to(w.dtype)


def weighted_qparams(w: Tensor, importance: Tensor, bits: int, group_size: int, symmetric: bool, *,
                     grid: int = 16, lo_factor: float = 0.75, hi_factor: float = 1.05) -> tuple[Tensor, Optional[Tensor]]:
    """Per group of ``w [N, K]``, the scale (and integer zero point) minimizing the importance-weighted
    rounding error ``Σ_k I_k (Q(w)_k − w_k)²``, ``importance [K]`` the mean squared input of each channel
    over calibration tokens (the diagonal of ``XᵀX / tokens``: llama.cpp's importance matrix).

    Candidates: the min-max scale times ``grid`` factors from ``lo_factor`` to ``hi_factor``, each with
    the zero point that keeps the group's minimum in range; each candidate's codes then get the scale
    that fits them best in weighted least squares (``s = Σ I w (q − z) / Σ I (q − z)²``), and are
    rounded again with it. The min-max scale (factor 1, no refit) is a candidate, so the result is
    never worse than min-max RTN by this error."""
    N, K = w.shape
    G = group_size
    assert importance.shape == (K,), f"importance must be [{K}], got {tuple(importance.shape)}"
    imp = importance.detach().float()
    imp = imp + 1e-6 * imp.mean().clamp_min(torch.finfo(torch.float32).tiny)  # a channel never seen still counts
    wg = w.detach().float().reshape(N, K // G, G)
    iw = imp.reshape(1, K // G, G)
    lo, hi = group_range(w, G)
    base, _ = range_qparams(lo, hi, bits, symmetric)
    eps = torch.finfo(torch.float32).tiny

    def codes(scale):
        zero = None if symmetric else range_zero(lo, scale, bits)
        return quantize(w, scale, zero, bits, G).float().reshape(N, K // G, G) - \
            (0.0 if zero is None else zero.float().unsqueeze(-1)), zero

    def error(qz, scale):
        return (iw * ((qz * scale.unsqueeze(-1)) - wg).square()).sum(-1)

    best_s = base
    qz, best_z = codes(base)
    best_err = error(qz, base)
    for f in torch.linspace(lo_factor, hi_factor, grid).tolist():
        qz, _ = codes(base * f)
        fit = (iw * wg * qz).sum(-1) / (iw * qz * qz).sum(-1).clamp_min(eps)
        scale = torch.where(fit > 0, fit, base * f).clamp_min(eps)
        qz, zero = codes(scale)
        err = error(qz, scale)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, scale, best_s)
        if zero is not None:
            best_z = torch.where(better, zero, best_z)
    return best_s, best_z
