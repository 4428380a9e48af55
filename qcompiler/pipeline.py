"""The pass pipeline: for each target, one readable ordered list of named passes.

    capture ─► normalize ─► [quantize_weights ─► fuse_weight_only] ─► paged_attention ─► export

Dispatch is on the target's config type; the manifest records every pass that ran, with
its parameters and seconds."""
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from torch.export import ExportedProgram
from torch.fx import GraphModule

from qcompiler.passes import fuse_weight_only, normalize, paged_attention, quantize_weights

from .targets import Float, Target, WeightOnly

Pass = tuple[str, Callable, dict]  # (name, fn, parameters recorded in the manifest)


def _float_passes(t: Float, progress: bool) -> list[Pass]:
    return []


def _weight_only_passes(t: WeightOnly, progress: bool) -> list[Pass]:
    params = dict(bits=t.bits, group_size=t.group_size, symmetric=t.symmetric, include_lm_head=t.quantize_lm_head)
    return [
        ("quantize_weights", partial(quantize_weights, **params, progress=progress), {"method": t.method, **params}),
        ("fuse_weight_only", fuse_weight_only, {}),
    ]


PIPELINES: dict[type, Callable[[Target, bool], list[Pass]]] = {
    Float: _float_passes,
    WeightOnly: _weight_only_passes,
}


def passes_for(target: Target, progress: bool = False) -> list[Pass]:
    for cls in type(target).__mro__:
        if cls in PIPELINES:
            return [("normalize", normalize, {}), *PIPELINES[cls](target, progress),
                    ("paged_attention", paged_attention, {})]
    raise TypeError(f"no pipeline for target type {type(target).__name__}")


@dataclass
class PipelineResult:
    gm: GraphModule
    records: list[dict] = field(default_factory=list)  # one per pass: name, params, seconds

    @property
    def layers(self) -> dict:
        return self.gm.meta.get("qc_layers", {})


def run_pipeline(ep: ExportedProgram, target: Target, progress: bool = False) -> PipelineResult:
    prog, records = ep, []
    for name, fn, params in passes_for(target, progress):
        t0 = time.perf_counter()
        prog = fn(prog)
        records.append({"name": name, "params": params, "seconds": round(time.perf_counter() - t0, 3)})
    return PipelineResult(prog, records)
