"""fuse_weight_only: ``aten.linear(x, qc.dequantize_weight(q, s, z, bits), b)`` ->
``qc.w4a16_linear`` / ``qc.w8a16_linear(x, q, s, z, b)``, one op a kernel can implement
without materializing the float weight. Invariant: outputs equal the unfused program."""
import torch
from torch.fx import GraphModule

from qcompiler.codegen.fx import finish, insert_call

aten, qc = torch.ops.aten, torch.ops.qc
FUSED = {4: qc.w4a16_linear.default, 8: qc.w8a16_linear.default}


def fuse_weight_only(gm: GraphModule) -> GraphModule:
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        x, w = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if w.op != "call_function" or w.target is not qc.dequantize_weight.default:
            continue
        qweight, scales, zeros, bits = w.args
        with gm.graph.inserting_before(node):
            fused = insert_call(gm, FUSED[bits], (x, qweight, scales, zeros, bias))
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
    return finish(gm)
