"""The pass pipeline: for each target, one readable ordered list of named passes.

    capture ─► normalize ─► [calibrated passes] ─► quantize ─► [fuse] ─► paged_attention ─► export

    w4a16/w8a16   [imatrix | gptq | awq | checkpoint_codes] ─► [quantize_lm_head] ─► quantize_weights
                  ─► fuse_weight_only
    w8a8          [smoothquant] ─► [gptq | checkpoint_codes] ─► quantize_w8a8 (static scales: an observer)
    fp8           [gptq | checkpoint_codes] ─► quantize_fp8

Methods ``checkpoint`` and ``qat``: codes that come with the model (a compressed-tensors checkpoint's,
``qcompiler.checkpoint``; trained ones, ``qcompiler.qat``), kept as they are.

Dispatch is on the target's config type; the manifest records every pass that ran, with
its parameters, seconds and, when a ``Checker`` is given, its check on probe inputs
(``qcompiler.verify``). A pass marked ``exact`` must keep the program's outputs; the others are
lossy by design. Calibrated passes receive the calibration samples."""
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, NamedTuple, Optional

from torch.export import ExportedProgram
from torch.fx import GraphModule

from qcompiler.passes import (awq, checkpoint_codes, fuse_weight_only, gptq, imatrix, normalize, paged_attention,
                              quantize_fp8, quantize_lm_head_if_cheap, quantize_w8a8, quantize_weights, smoothquant)

from .targets import AUTO, AUTO_METHOD, CODED, FP8, LM_HEAD_MAX_INCREASE, W8A8, Float, Target, WeightOnly
from .verify import Checker


class Pass(NamedTuple):
    name: str
    fn: Callable
    params: dict           # recorded in the manifest
    exact: bool = False    # must keep the program's outputs (float tolerance)
    rounds_activations: bool = False  # from here on the program quantizes activations (verify.Checker)


Samples = Optional[list]
Codes = Optional[dict]  # a checkpoint's codes: module name -> QuantizedWeight


def _float_passes(t: Float, progress: bool, samples: Samples, codes: Codes) -> list[Pass]:
    return []


def _gptq_pass(samples: Samples, progress: bool, **params) -> Pass:
    params = {**params, "damp": 0.01}
    return Pass("gptq", partial(gptq, samples=samples, **params, progress=progress), params)


def _checkpoint_pass(codes: Codes, every_linear: bool = False) -> Pass:
    assert codes, "method 'checkpoint' needs the checkpoint's codes"
    return Pass("checkpoint_codes", partial(checkpoint_codes, codes=codes, every_linear=every_linear),
                {"layers": len(codes)})


def _weight_only_passes(t: WeightOnly, progress: bool, samples: Samples, codes: Codes) -> list[Pass]:
    params = dict(bits=t.bits, group_size=t.group_size, symmetric=t.symmetric, include_lm_head=t.quantize_lm_head)
    head = []
    if t.lm_head_bits == 8:  # an int8 output projection per channel, RTN here or the codes given with it
        hp = dict(bits=t.lm_head_bits, group_size=None, symmetric=True)
        head = [Pass("quantize_lm_head", partial(quantize_weights, **hp, include_lm_head=True, lm_head_only=True), hp)]
    if t.method in CODED:
        return [_checkpoint_pass(codes), *head,
                Pass("quantize_weights", partial(quantize_weights, **params, only_coded=True), {"method": t.method, **params}),
                Pass("fuse_weight_only", fuse_weight_only, {}, exact=True)]
    calibrated = {
        "rtn": [],
        "imatrix": [Pass("imatrix", partial(imatrix, samples=samples, **params, progress=progress), params)],
        "gptq": [_gptq_pass(samples, progress, **params, act_order=t.act_order, clip=t.clip)],
        "awq": [Pass("awq", partial(awq, samples=samples, **params, clip=t.clip, progress=progress),
                 {**params, "n_grid": 20, "clip": t.clip})],
    }[t.method]
    if t.lm_head_bits == AUTO:
        hp = dict(bits=8, group_size=None, symmetric=True, max_perplexity_increase=LM_HEAD_MAX_INCREASE)
        head = [Pass("quantize_lm_head", partial(quantize_lm_head_if_cheap, samples=samples, bits=8,
                                                 max_increase=LM_HEAD_MAX_INCREASE), hp)]
    return [
        *calibrated,
        *head,
        # after gptq/awq, whose codes or clipped weights it takes as they are, clip is RTN's own search
        Pass("quantize_weights", partial(quantize_weights, **params, clip=t.clip and t.method == "rtn", progress=progress),
         {"method": t.method, **params}),
        Pass("fuse_weight_only", fuse_weight_only, {}, exact=True),
    ]


def _w8a8_passes(t: W8A8, progress: bool, samples: Samples, codes: Codes) -> list[Pass]:
    head = dict(include_lm_head=t.quantize_lm_head)
    out = [_checkpoint_pass(codes, every_linear=True)] if t.method in CODED else []
    if t.smoothquant_alpha is not None:
        out.append(Pass("smoothquant", partial(smoothquant, samples=samples, alpha=t.smoothquant_alpha, **head,
                                               progress=progress), {"alpha": t.smoothquant_alpha}, exact=True))
    if t.method == "gptq":
        out.append(_gptq_pass(samples, progress, bits=8, group_size=None, symmetric=True, act_order=True, **head))
    out.append(Pass("quantize_w8a8", partial(quantize_w8a8, samples=samples, observer=t.observer, **head,
                                         progress=progress), {"method": t.method, "observer": t.observer},
                    rounds_activations=True))
    return out


def _fp8_passes(t: FP8, progress: bool, samples: Samples, codes: Codes) -> list[Pass]:
    head = dict(include_lm_head=t.quantize_lm_head)
    out = [_checkpoint_pass(codes, every_linear=True)] if t.method in CODED else []
    if t.method == "gptq":
        out.append(_gptq_pass(samples, progress, bits=8, group_size=None, symmetric=True, act_order=True, fp8=True,
                              **head))
    out.append(Pass("quantize_fp8", partial(quantize_fp8, **head), {"method": t.method}, rounds_activations=True))
    return out


PIPELINES: dict[type, Callable[[Target, bool, Samples, Codes], list[Pass]]] = {
    Float: _float_passes,
    WeightOnly: _weight_only_passes,
    W8A8: _w8a8_passes,
    FP8: _fp8_passes,
}


def passes_for(target: Target, progress: bool = False, samples: Samples = None, codes: Codes = None) -> list[Pass]:
    """The target's passes. A weight-only ``method="auto"`` runs imatrix when given samples, else
    rtn (``compiler.resolve_method`` decides it, with a warning, before calibration data is loaded)."""
    if getattr(target, "method", None) == AUTO_METHOD:
        target = replace(target, method="imatrix" if samples else "rtn")
    if target.needs_calibration and not samples:
        raise ValueError(f"{target.name} with {target.scheme} needs calibration samples")
    for cls in type(target).__mro__:
        if cls in PIPELINES:
            return [Pass("normalize", normalize, {}, exact=True), *PIPELINES[cls](target, progress, samples, codes),
                    Pass("paged_attention", paged_attention, {}, exact=True)]
    raise TypeError(f"no pipeline for target type {type(target).__name__}")


@dataclass
class PipelineResult:
    gm: GraphModule
    records: list[dict] = field(default_factory=list)  # one per pass: name, params, seconds[, exact, check]

    @property
    def layers(self) -> dict:
        return self.gm.meta.get("qc_layers", {})


def run_pipeline(ep: ExportedProgram, target: Target, progress: bool = False, samples: Samples = None,
                 checker: Optional[Checker] = None, codes: Codes = None) -> PipelineResult:
    """Runs the target's passes in order; with a ``checker``, each pass's program is
    checked against the one before it, and an exact pass that changes the outputs raises
    ``VerificationError``."""
    prog, records = ep, []
    for p in passes_for(target, progress, samples, codes):
        t0 = time.perf_counter()
        prog = p.fn(prog)
        rec = {"name": p.name, "params": p.params, "seconds": round(time.perf_counter() - t0, 3), "exact": p.exact}
        if checker is not None:
            rec["check"] = checker.check(p.name, prog, p.exact, p.rounds_activations)
        records.append(rec)
    return PipelineResult(prog, records)
