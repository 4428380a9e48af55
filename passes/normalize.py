"""normalize: the captured program as a flat ATen GraphModule the other passes can match.

Runs the default decompositions except for ``aten.linear`` and SDPA (the ops the quantize
and attention passes rewrite), unlifts parameters into ``get_attr`` constants, and drops
nodes that compute nothing (metadata asserts, aliases, same-dtype copies).
Invariant: outputs equal the captured program's (float tolerance)."""
import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule

from qcompiler.codegen.fx import finish

aten = torch.ops.aten
KEEP = (aten.linear.default, aten.scaled_dot_product_attention.default)
ASSERTS = (aten._assert_tensor_metadata.default,)
IDENTITIES = (aten.alias.default, aten.detach.default)  # NOTE: not clone: it may fix strides a view needs


def _is_noop_copy(node) -> bool:
    if node.target is not aten._to_copy.default or set(node.kwargs) - {"dtype", "layout", "device"}:
        return False
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    return src is not None and out is not None and src.dtype == out.dtype and src.device == out.device


def normalize(ep: ExportedProgram) -> GraphModule:
    table = torch.export.default_decompositions()
    for op in KEEP:
        table.pop(op, None)
    gm = ep.run_decompositions(table).module()
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in ASSERTS:
            gm.graph.erase_node(node)
        elif node.target in IDENTITIES or _is_noop_copy(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    return finish(gm)
