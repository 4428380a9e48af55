"""Per-input-channel scale migration: SmoothQuant and AWQ.

Both rewrite ``x Wᵀ`` as ``(x / s)(W·diag(s))ᵀ`` for a group of linears reading one input,
with ``1/s`` folded into what produces ``x`` (a norm's weight, or the rows of the linear before
it: ``passes.calibrate.smoothing_site``), so the float program computes the same function.
They differ in how ``s`` is chosen:
  * SmoothQuant (W8A8): ``s_j = max|X_j|^α / max|W_j|^(1−α)``, activation outliers moved into
    the weights so that per-token int8 activations lose less;
  * AWQ (weight-only): a grid search (``quantization.awq_scales``) over the exponent of the
    activation magnitude (and the weights', "duo scaling"), keeping the ``s`` whose quantized
    weights give the smallest output error on calibration tokens; RTN follows in ``quantize_weights``.
Groups without a site are left alone (logged once, recorded in ``gm.meta["qc_layers"]``)."""
import logging

import torch
from torch import Tensor
from torch.fx import GraphModule

from qcompiler.codegen.fx import get_constant, set_constant

from .calibrate import fold_scales, input_rows, linear_groups, propagate, smoothing_site
from .quantization import awq_scales, clip_ratios, clip_weight
from .quantize_weights import GroupSize, layer_group, layer_name, output_linears, quantizable

log = logging.getLogger("qcompiler")
EPS = 1e-5


def _record(gm: GraphModule, group, **fields) -> None:
    layers = gm.meta.setdefault("qc_layers", {})
    for name in group.weight_names():
        layers.setdefault(layer_name(name), {}).update(fields)


def _weights(gm: GraphModule, group) -> Tensor:
    return torch.cat([get_constant(gm, n).float() for n in group.weight_names()])  # [sum N, K]


def _apply(gm: GraphModule, group, site, s: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    fold_scales(gm, group, site, s)
    return [(x.float() / s).to(x.dtype) for x in inputs]


def smoothquant(gm: GraphModule, samples: list[Tensor], *, alpha: float, include_lm_head: bool = False,
                progress: bool = False) -> GraphModule:
    heads = output_linears(gm)
    groups = linear_groups(gm, lambda n: include_lm_head or n not in heads)

    def hook(group, inputs):
        site = smoothing_site(gm, group)
        if site is None or site.kind != "norm":  # SmoothQuant's mappings: norm -> q/k/v, norm -> gate/up
            return None
        x_max = torch.stack([x.reshape(-1, x.shape[-1]).abs().amax(0) for x in inputs]).amax(0).float()
        w_max = _weights(gm, group).abs().amax(0)
        s = x_max.clamp_min(EPS).pow(alpha) / w_max.clamp_min(EPS).pow(1 - alpha)
        s = torch.where(w_max > 0, s, x_max).clamp_min(EPS)
        _record(gm, group, smoothquant={"alpha": alpha, "into": layer_name(site.weight),
                                        "scale_range": [round(float(s.min()), 4), round(float(s.max()), 4)]})
        return _apply(gm, group, site, s, inputs)

    propagate(gm, samples, groups, hook, desc="smoothquant", progress=progress)
    return gm


def awq(gm: GraphModule, samples: list[Tensor], *, bits: int, group_size: GroupSize, symmetric: bool,
        include_lm_head: bool = False, n_grid: int = 20, clip: bool = True, progress: bool = False) -> GraphModule:
    """AWQ scales, then (``clip``) each weight clamped to the per-group range ``clip_ratios`` picks on the
    scaled inputs' Hessian, so that RTN's min-max qparams are the clipped ones."""
    groups = linear_groups(gm, quantizable(gm, bits, group_size, include_lm_head))
    skipped = set()

    def clip_group(group, x: Tensor) -> dict:
        h = x.t() @ x
        ratios = []
        for name in group.weight_names():
            w = get_constant(gm, name)
            G = layer_group(group_size, w.shape[1]) or w.shape[1]
            p = clip_ratios(w, bits, G, symmetric, h)
            set_constant(gm, name, clip_weight(w, G, p))
            ratios.append(p.flatten())
        return {"mean_clip_ratio": round(float(torch.cat(ratios).mean()), 4)}

    def hook(group, inputs):
        site = smoothing_site(gm, group)
        x = input_rows(inputs)
        if site is None:
            names = ", ".join(layer_name(n) for n in group.weight_names())
            if not skipped:
                log.info("awq: %s: no norm or linear to fold a scale into; no scale", names)
            skipped.add(names)
            _record(gm, group, awq={"scale": "no scale site", **(clip_group(group, x) if clip else {})})
            return None
        w = _weights(gm, group)
        s, r, err = awq_scales(x, w, bits, layer_group(group_size, w.shape[1]), symmetric, n_grid)
        scaled = _apply(gm, group, site, s, inputs)
        _record(gm, group, awq={"ratio": r, "into": layer_name(site.weight), "search_mse": err,
                                **(clip_group(group, x / s) if clip else {})})
        return scaled

    propagate(gm, samples, groups, hook, desc="awq", progress=progress)
    return gm
