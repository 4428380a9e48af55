"""Load-time lowering for CPU: swaps canonical weight-only linears for ops that run our own int4/int8
kernel (``cpu_native``) or torch's packed CPU kernels, repacking each weight once (never per call).

Linears that read the same input with the same scheme (q/k/v, gate/up) are merged into one
call on the concatenated weight, then split: rows quantize independently, so this is exact,
and one wide call costs far less than several narrow ones at decode sizes (bench/linear_cpu.py)."""
import operator
from collections import defaultdict

import torch
from torch.fx import GraphModule, Node

from . import act_quant, attention, cpu_native, ops
from .fx import finish, free_name, get_constant, insert_call, insert_constant
from .ops import aligned, linear_bf16

qc, aten = torch.ops.qc, torch.ops.aten
BITS = {qc.w4a16_linear.default: 4, qc.w8a16_linear.default: 8}


def pack_int4_for_cpu(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None):
    """Canonical int4 -> (``int4pack``, ``scales_and_zeros`` bf16 ``[K/G, N, 2]``) for
    ``torch._weight_int4pack_mm_for_cpu``, whose dequantization is ``(u - 8) * s + m`` on
    unsigned nibbles ``u``. Ours is ``(u - 8 - z) * s``, so ``m = -z * s``: exact."""
    u = torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1).to(torch.int32)
    int4pack = torch._convert_weight_to_int4pack_for_cpu(u, 1)
    s = scales.float()
    m = torch.zeros_like(s) if zeros is None else -zeros.float() * s
    return int4pack, torch.stack([s.t(), m.t()], dim=-1).contiguous().to(torch.bfloat16)


def _constants(gm: GraphModule, node: Node):
    """(qweight, scales, zeros, bias) of a weight-only linear, or None unless all are constants."""
    _, *args = node.args
    if any(a is not None and a.op != "get_attr" for a in args):
        return None
    return [None if a is None else get_constant(gm, a.target) for a in args]


def sibling_key(gm: GraphModule, node: Node):
    """Nodes with equal keys read one input with one scheme and can share one call; None unless
    every operand is a constant."""
    c = _constants(gm, node)
    if c is None:
        return None
    _, scales, zeros, bias = c
    return (node.args[0], BITS[node.target], scales.shape[1], zeros is None, bias is None, scales.dtype)


def _cpu_key(gm: GraphModule, node: Node):
    """``sibling_key``, or None: this node has no CPU fast path."""
    key = sibling_key(gm, node)
    if key is None:
        return None
    _, bits, ngroups = key[:3]
    K = get_constant(gm, node.args[1].target).shape[1] * (2 if bits == 4 else 1)
    if (K // ngroups) % 4 == 0 and cpu_native.available():  # our kernel: any group of 4k
        return key
    if bits == 4 and (K // ngroups not in (32, 64, 128, 256) or K % 32):
        return None
    if bits == 8 and ngroups != 1:
        return None
    return key


def _cat(ts):
    return None if ts[0] is None else torch.cat(ts, dim=0)


def lower_linears(gm: GraphModule, key, emit, merge: bool = True) -> GraphModule:
    """Replaces each weight-only linear whose ``key(gm, node)`` is not None with what
    ``emit(gm, put, x, bits, qweight, scales, zeros, bias)`` inserts; nodes with equal keys (siblings
    reading one input with one scheme) become one call on their concatenated weights when ``merge``."""
    groups: dict[tuple, list[Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in BITS:
            k = key(gm, node)
            if k is not None:
                groups[k if merge else (k, node)].append(node)
    for nodes in groups.values():
        _lower_group(gm, nodes, emit)
    return finish(gm)


def _lower_group(gm: GraphModule, nodes: list[Node], emit) -> None:
    consts = [_constants(gm, n) for n in nodes]
    qweight, scales, zeros, bias = (_cat([c[i] for c in consts]) for i in range(4))
    sizes = [c[0].shape[0] for c in consts]
    # NOTE: unique: one weight may feed several groups (a tied or reused weight)
    prefix = free_name(gm, nodes[0].args[1].target.rpartition(".")[0] + ("_merged" if len(nodes) > 1 else "") + "_lowered")
    prefix += "."
    with gm.graph.inserting_before(nodes[0]):
        put = lambda name, t: None if t is None else insert_constant(gm, prefix + name, t)  # noqa: E731
        out = emit(gm, put, nodes[0].args[0], BITS[nodes[0].target], qweight, scales, zeros, bias)
        if len(nodes) == 1:
            nodes[0].replace_all_uses_with(out)
        else:
            parts = insert_call(gm, aten.split_with_sizes.default, (out, sizes, -1))
            for i, n in enumerate(nodes):
                n.replace_all_uses_with(insert_call(gm, operator.getitem, (parts, i)))
    for n in nodes:
        gm.graph.erase_node(n)


def _emit_cpu(gm, put, x, bits, qweight, scales, zeros, bias) -> Node:
    if _native(qweight, scales, bits):
        packed, block_scales, block_biases = cpu_native.pack_native(qweight, scales, zeros, bits)
        args = (x, put("packed", packed), put("block_scales", block_scales), put("block_biases", block_biases),
                put("qweight", qweight), put("scales", scales), put("zeros", zeros), put("bias", bias), bits)
        return insert_call(gm, qc.wq_linear_native.default, args)
    if bits == 4:
        int4pack, sz = pack_int4_for_cpu(qweight, scales, zeros)
        args = (x, put("int4pack", int4pack), put("scales_and_zeros", sz), put("qweight", qweight),
                put("scales", scales), put("zeros", zeros), put("bias", bias))
        return insert_call(gm, qc.w4a16_linear_cpu.default, args)
    # NOTE: scales in bf16, as the int8pack kernel reads them: Inductor's lowering of that kernel
    # takes a stored tensor, not one cast in the graph
    args = (x, put("qweight", aligned(qweight)), put("scales", scales.to(torch.bfloat16)), put("zeros", zeros),
            put("bias", bias))
    return insert_call(gm, qc.w8a16_linear_cpu.default, args)


def _native(qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> bool:
    group = qweight.shape[1] * (2 if bits == 4 else 1) // scales.shape[1]
    return group % 4 == 0 and cpu_native.available()


def lower_for_cpu(gm: GraphModule, merge: bool = True) -> GraphModule:
    """``qc.w4a16_linear`` and ``qc.w8a16_linear`` -> ``qc.wq_linear_native`` (our AVX-512
    kernel, fp32 activations, any group of a multiple of 4; where it is unavailable,
    ``qc.w4a16_linear_cpu`` / per-channel ``qc.w8a16_linear_cpu``: torch's int4pack/int8pack with
    bf16 activations), siblings merged when ``merge``.
    Outputs equal the canonical program up to fp32 summation order (native) or bf16 activation
    rounding (torch's packed kernels)."""
    return lower_linears(gm, _cpu_key, _emit_cpu, merge)


def float_linears_to_bf16(gm: GraphModule) -> GraphModule:
    """Float ``aten.linear`` layers with constant weights (lm_head, layers a scheme skipped) ->
    ``linear_bf16`` on a bf16 copy of the weight: a weight-only artifact's 16-bit activations
    for them too, and half the bytes per step for lm_head, the largest matrix of a small model."""
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.linear.default]:
        x, w, *rest = node.args
        b = rest[0] if rest else None
        if w.op != "get_attr" or (b is not None and b.op != "get_attr"):
            continue
        weight = get_constant(gm, w.target)
        if weight.dtype != torch.float32:
            continue
        name = free_name(gm, w.target + "_bf16")
        with gm.graph.inserting_before(node):
            wb = insert_constant(gm, name, weight.detach().to(torch.bfloat16))
            node.replace_all_uses_with(insert_call(gm, linear_bf16, (x, wb, b)))
        gm.graph.erase_node(node)
    return finish(gm)


# The custom ops an eager program may call as plain functions: same code, no dispatcher.
DIRECT = {qc.w4a16_linear_cpu.default: ops.w4a16_linear_cpu_impl,
          qc.wq_linear_native.default: ops.wq_linear_native_impl,
          qc.w8a16_linear_cpu.default: ops.w8a16_linear_cpu_impl,
          qc.reshape_and_cache.default: attention.reshape_and_cache_impl,
          qc.paged_attention.default: attention.paged_attention_impl,
          qc.w8a8_linear.default: act_quant.w8a8_linear_impl,
          qc.fp8_linear.default: act_quant.fp8_linear_impl}


# What a program under torch.compile calls instead: the same code, traced by Dynamo, so that
# Inductor sees torch's own kernels (int4pack, SDPA) and fuses the casts and reshapes around them.
TRACED = {qc.w4a16_linear_cpu.default: ops.w4a16_linear_cpu_impl,
          qc.wq_linear_native.default: ops.wq_linear_native_impl,
          qc.w8a16_linear_cpu.default: ops.w8a16_linear_cpu_impl,
          qc.paged_attention.default: attention.paged_attention_for_compile,
          qc.reshape_and_cache.default: attention.reshape_and_cache_for_compile}


def trace_through(gm: GraphModule) -> GraphModule:
    """Before ``torch.compile`` on CPU: the ``qc`` ops whose code Dynamo can trace without a host
    sync are called as that code (``TRACED``); the rest stay opaque ops."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in TRACED:
            node.target = TRACED[node.target]
    gm.recompile()
    return gm


def call_directly(gm: GraphModule) -> GraphModule:
    """Every ``qc`` op with a plain implementation is called as that function, without the
    custom-op dispatcher. For eager execution only: ``torch.compile`` wants the opaque ops."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in DIRECT:
            node.target = DIRECT[node.target]
    gm.recompile()
    return gm


def call_native_ops(gm: GraphModule) -> GraphModule:
    """Before an ahead-of-time compile on CPU (``qcompiler.aot``): ``qc.wq_linear_native`` ->
    ``qc_cpu::wq_linear``, the C++ op it calls; ``qc.paged_attention`` -> ``qc_cpu::paged_attention``
    (decode steps in C++, the others handed back to it) where our kernels are built; and the KV
    write traced as for ``torch.compile``; so the library runs decode steps without Python. The
    other ``qc`` ops stay opaque (the library calls them through the dispatcher)."""
    native = cpu_native.available() and cpu_native.avx512()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is qc.wq_linear_native.default:
            node.target = torch.ops.qc_cpu.wq_linear.default
            node.args = (*node.args, ops.NATIVE_MAX_ROWS, cpu_native.BF16_NATIVE)
        elif node.op == "call_function" and node.target is qc.paged_attention.default and native:
            node.target = torch.ops.qc_cpu.paged_attention.default
        elif node.op == "call_function" and node.target is qc.reshape_and_cache.default:
            node.target = attention.reshape_and_cache_for_compile
    gm.recompile()
    return gm

