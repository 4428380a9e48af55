"""The load-time lowerings: for each device kind, one readable ordered list of named graph
rewrites that swap a paged program's canonical ops for that device's fast kernels.

    cpu   build_cpu_kernels ─► lower_for_cpu ─► [float_linears_to_bf16] ─► hoist_constants
          ─► trace_through (under torch.compile) | call_directly (eager)
    cuda  lower_for_cuda ─► [float_linears_to_bf16] ─► hoist_constants

``float_linears_to_bf16`` runs for weight-only targets (``A16_TARGETS``) only. Every lowering is
graph surgery, so either kind's list can be built and run on the CPU. ``lower`` records each one
that ran with its parameters and seconds, as the compile pipeline records its passes; ``load``
keeps those records on the model (``CompiledModel.lowerings``)."""
import time
from functools import partial
from typing import Callable, NamedTuple

from torch.fx import GraphModule

from qcompiler.codegen import cpu_native
from qcompiler.codegen.cpu import call_directly, float_linears_to_bf16, lower_for_cpu, trace_through
from qcompiler.codegen.cuda import lower_for_cuda
from qcompiler.codegen.fx import hoist_constants

Lowering = tuple[str, Callable[[GraphModule], GraphModule], dict]  # (name, fn, parameters recorded)

A16_TARGETS = ("w4a16", "w8a16")  # weight-only targets: 16-bit activations everywhere when fast


def build_cpu_kernels(gm: GraphModule) -> GraphModule:
    """Our C++ CPU kernels, built once per process before the lowering and attention ask for
    them (``cpu_native.available``); the program is returned unchanged."""
    cpu_native.available()
    return gm


def _a16_lowerings(target_name: str) -> list[Lowering]:
    return [("float_linears_to_bf16", float_linears_to_bf16, {})] if target_name in A16_TARGETS else []


def _cpu_lowerings(target_name: str, compile: bool) -> list[Lowering]:
    return [
        ("build_cpu_kernels", build_cpu_kernels, {}),
        ("lower_for_cpu", partial(lower_for_cpu, merge=True), {"merge": True}),
        *_a16_lowerings(target_name),
        ("hoist_constants", hoist_constants, {}),
        ("trace_through", trace_through, {}) if compile else ("call_directly", call_directly, {}),
    ]


def _cuda_lowerings(target_name: str, compile: bool) -> list[Lowering]:
    return [
        ("lower_for_cuda", partial(lower_for_cuda, merge=True), {"merge": True}),
        *_a16_lowerings(target_name),
        ("hoist_constants", hoist_constants, {}),
    ]


LOWERINGS: dict[str, Callable[[str, bool], list[Lowering]]] = {
    "cpu": _cpu_lowerings,
    "cuda": _cuda_lowerings,
}


def lowerings_for(kind: str, target_name: str, compile: bool) -> list[Lowering]:
    """The ordered lowerings of device ``kind`` for an artifact of target ``target_name``;
    ``compile``: the program will run under ``torch.compile``."""
    if kind not in LOWERINGS:
        raise ValueError(f"no lowerings for device kind {kind!r}; available: {', '.join(LOWERINGS)}")
    return LOWERINGS[kind](target_name, compile)


class Lowered(NamedTuple):
    gm: GraphModule
    records: list[dict]  # one per lowering, in order: name, params, seconds


def lower(gm: GraphModule, target_name: str, kind: str, compile: bool) -> Lowered:
    """Runs ``lowerings_for(kind, target_name, compile)`` on ``gm`` in order, recording each."""
    records = []
    for name, fn, params in lowerings_for(kind, target_name, compile):
        t0 = time.perf_counter()
        gm = fn(gm)
        records.append({"name": name, "params": params, "seconds": round(time.perf_counter() - t0, 3)})
    return Lowered(gm, records)
