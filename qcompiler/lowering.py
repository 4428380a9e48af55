"""The load-time lowerings: for each device kind, one readable ordered list of named graph
rewrites that swap a paged program's canonical ops for that device's fast kernels.

    cpu   build_cpu_kernels ─► lower_for_cpu ─► [float_linears_to_bf16] ─► hoist_constants
          ─► call_native_ops (ahead of time, ``qcompiler.aot``) | trace_through (under
             ``torch.compile``) | call_directly (eager)
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
from qcompiler.codegen.cpu import call_directly, call_native_ops, float_linears_to_bf16, lower_for_cpu, trace_through
from qcompiler.codegen.cuda import lower_for_cuda
from qcompiler.codegen.fx import hoist_constants

Lowering = tuple[str, Callable[[GraphModule], GraphModule], dict]  # (name, fn, parameters recorded)

A16_TARGETS = ("w4a16", "w8a16")  # weight-only targets: 16-bit activations everywhere when fast
MODES = ("eager", "jit", "aot")  # how the lowered program will run: as is, under torch.compile, compiled ahead of time
LAST_CPU_LOWERING = {"eager": ("call_directly", call_directly), "jit": ("trace_through", trace_through),
                     "aot": ("call_native_ops", call_native_ops)}


def build_cpu_kernels(gm: GraphModule) -> GraphModule:
    """Our C++ CPU kernels, built once per process before the lowering and attention ask for
    them (``cpu_native.available``); the program is returned unchanged."""
    cpu_native.available()
    return gm


def _a16_lowerings(target_name: str) -> list[Lowering]:
    return [("float_linears_to_bf16", float_linears_to_bf16, {})] if target_name in A16_TARGETS else []


def _cpu_lowerings(target_name: str, mode: str) -> list[Lowering]:
    return [
        ("build_cpu_kernels", build_cpu_kernels, {}),
        ("lower_for_cpu", partial(lower_for_cpu, merge=True), {"merge": True}),
        *_a16_lowerings(target_name),
        ("hoist_constants", hoist_constants, {}),
        (*LAST_CPU_LOWERING[mode], {}),
    ]


def _cuda_lowerings(target_name: str, mode: str) -> list[Lowering]:
    return [
        ("lower_for_cuda", partial(lower_for_cuda, merge=True), {"merge": True}),
        *_a16_lowerings(target_name),
        ("hoist_constants", hoist_constants, {}),
    ]


LOWERINGS: dict[str, Callable[[str, str], list[Lowering]]] = {
    "cpu": _cpu_lowerings,
    "cuda": _cuda_lowerings,
}


def lowerings_for(kind: str, target_name: str, mode: str | bool) -> list[Lowering]:
    """The ordered lowerings of device ``kind`` for an artifact of target ``target_name``;
    ``mode`` (``MODES``): how the program will run (True: "jit", False: "eager")."""
    if kind not in LOWERINGS:
        raise ValueError(f"no lowerings for device kind {kind!r}; available: {', '.join(LOWERINGS)}")
    mode = {True: "jit", False: "eager"}.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; available: {', '.join(MODES)}")
    return LOWERINGS[kind](target_name, mode)


class Lowered(NamedTuple):
    gm: GraphModule
    records: list[dict]  # one per lowering, in order: name, params, seconds


def lower(gm: GraphModule, target_name: str, kind: str, mode: str | bool) -> Lowered:
    """Runs ``lowerings_for(kind, target_name, mode)`` on ``gm`` in order, recording each."""
    records = []
    for name, fn, params in lowerings_for(kind, target_name, mode):
        t0 = time.perf_counter()
        gm = fn(gm)
        records.append({"name": name, "params": params, "seconds": round(time.perf_counter() - t0, 3)})
    return Lowered(gm, records)
