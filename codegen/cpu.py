"""Load-time lowering for CPU: swaps canonical weight-only linears for ops that run torch's
packed CPU kernels, repacking each weight once (never per call)."""
import torch
from torch.fx import GraphModule

from . import ops  # noqa: F401  (registers qc::)
from .fx import finish, get_constant, insert_call, insert_constant, set_constant
from .ops import aligned

qc = torch.ops.qc


def pack_int4_for_cpu(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None):
    """Canonical int4 -> (``int4pack``, ``scales_and_zeros`` bf16 ``[K/G, N, 2]``) for
    ``torch._weight_int4pack_mm_for_cpu``, whose dequantization is ``(u - 8) * s + m`` on
    unsigned nibbles ``u``. Ours is ``(u - 8 - z) * s``, so ``m = -z * s``: exact."""
    u = torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1).to(torch.int32)
    int4pack = torch._convert_weight_to_int4pack_for_cpu(u, 1)
    s = scales.float()
    m = torch.zeros_like(s) if zeros is None else -zeros.float() * s
    return int4pack, torch.stack([s.t(), m.t()], dim=-1).contiguous().to(torch.bfloat16)


def _packable_group(qweight, scales) -> bool:
    K = qweight.shape[1] * 2
    return K // scales.shape[1] in (32, 64, 128, 256) and scales.shape[0] % 16 == 0 and K % 32 == 0


def lower_for_cpu(gm: GraphModule) -> GraphModule:
    """``qc.w4a16_linear`` -> ``qc.w4a16_linear_cpu`` (int4pack), ``qc.w8a16_linear`` with
    per-channel scales -> ``qc.w8a16_linear_cpu``. Outputs equal up to bf16 activation rounding."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (qc.w4a16_linear.default, qc.w8a16_linear.default):
            continue
        x, qw_n, s_n, z_n, bias = node.args
        if any(a is not None and a.op != "get_attr" for a in (qw_n, s_n, z_n)):
            continue
        qweight, scales = get_constant(gm, qw_n.target), get_constant(gm, s_n.target)
        zeros = None if z_n is None else get_constant(gm, z_n.target)
        with gm.graph.inserting_before(node):
            if node.target == qc.w4a16_linear.default:
                if not _packable_group(qweight, scales):
                    continue
                prefix = qw_n.target.rpartition(".")[0]
                int4pack, sz = pack_int4_for_cpu(qweight, scales, zeros)
                p_n = insert_constant(gm, f"{prefix}.int4pack", int4pack)
                sz_n = insert_constant(gm, f"{prefix}.scales_and_zeros", sz)
                new = insert_call(gm, qc.w4a16_linear_cpu.default, (x, p_n, sz_n, qw_n, s_n, z_n, bias))
            else:
                if scales.shape[1] != 1:
                    continue
                set_constant(gm, qw_n.target, aligned(qweight))  # once here, not per call
                new = insert_call(gm, qc.w8a16_linear_cpu.default, (x, qw_n, s_n, z_n, bias))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    return finish(gm)
