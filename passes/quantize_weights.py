"""quantize_weights: round-to-nearest weight quantization as inserted dequantize nodes.

Every ``aten.linear`` whose weight is a constant gets ``qc.dequantize_weight(qweight, scales,
zeros)`` of that weight in its place; the integer weights become the program's constants.
Invariant: outputs equal the float program with each such weight replaced by
``dequantize(quantize(W))`` (the plain-PyTorch reference of the scheme). ``group_size="auto"``
gives each layer the largest of ``AUTO_GROUPS`` that divides its input size (``layer_group``).
Layers the scheme cannot take (input size not divisible by the group size) and the output
projection (lm_head, unless asked) stay float; ``gm.meta["qc_layers"]`` records what happened to
each, with its group size."""
import logging
from typing import Optional, Union

import torch
from torch.fx import GraphModule, Node
from tqdm import tqdm

from qcompiler.codegen.fx import finish, get_constant, insert_call, insert_constant
from qcompiler.codegen.quant import dequantize_weight_ref, quantize_weight, sqnr_db

from .quantization import search_qparams

log = logging.getLogger("qcompiler")
aten = torch.ops.aten
AUTO, AUTO_GROUPS = "auto", (128, 64, 32)
GroupSize = Union[int, str, None]


def linear_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.linear.default]


def output_linears(gm: GraphModule) -> set[Node]:
    """Linears whose result reaches the program output without passing another linear (lm_head)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    found, seen, stack = set(), set(), list(out.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is aten.linear.default:
            found.add(n)
        else:
            stack.extend(n.all_input_nodes)
    return found


def layer_name(fqn: str) -> str:
    """Graph constant name -> the model's own module name (drops the capture wrapper's prefix)."""
    return fqn.removeprefix("model.").removesuffix(".weight")


def constants_prefix(fqn: str) -> str:
    """Where a weight's integer codes, scales and zero points live: beside ``module.weight``
    in its module, or in a new submodule ``<name>_q`` for a bare parameter ``module.<name>``."""
    return fqn.removesuffix(".weight") if fqn.endswith(".weight") else f"{fqn}_q"


def _role(node: Node, heads: set[Node]) -> dict:
    return {"role": "lm_head"} if node in heads else {}


def layer_group(group_size: GroupSize, K: int) -> Optional[int]:
    """The group size a linear of input size ``K`` gets: ``group_size`` itself, None (per output
    channel), or for ``"auto"`` the largest of ``AUTO_GROUPS`` dividing ``K`` (the largest of them
    when none does: the layer then stays float)."""
    if group_size != AUTO:
        return group_size
    return next((g for g in AUTO_GROUPS if K % g == 0), AUTO_GROUPS[0])


def skip_reason(node: Node, K: int, heads: set[Node], bits: int, group_size: GroupSize,
                include_lm_head: bool) -> Optional[str]:
    """Why a constant-weight linear stays float under a scheme, or None: it is quantized."""
    G = layer_group(group_size, K) or K
    if node in heads and not include_lm_head:
        return "output projection (lm_head) kept float unless asked"
    if K % G or (bits == 4 and K % 2):
        groups = " or ".join(map(str, AUTO_GROUPS)) if group_size == AUTO else G
        return f"input size {K} not divisible by group size {groups}"
    return None


def quantizable(gm: GraphModule, bits: int, group_size: GroupSize, include_lm_head: bool):
    """``node -> bool``: the linears ``quantize_weights`` would quantize (for calibration passes)."""
    heads = output_linears(gm)
    return lambda n: skip_reason(n, get_constant(gm, n.args[1].target).shape[1], heads, bits, group_size,
                                 include_lm_head) is None


def quantize_weights(gm: GraphModule, *, bits: int, group_size: GroupSize, symmetric: bool,
                     include_lm_head: bool = False, clip: bool = False, progress: bool = False,
                     lm_head_only: bool = False, only_coded: bool = False) -> GraphModule:
    """RTN (``clip``: with the ranges ``quantization.search_qparams`` picks by weight error), unless a
    calibration pass left codes in ``gm.meta["qc_codes"]`` (weight name -> (``QuantizedWeight``,
    the original weight's record)): then those codes are used as they are, their groups with them.
    ``lm_head_only``: the output projections alone (a scheme of their own, run before the one for
    every other linear). ``only_coded``: linears without codes stay float (a checkpoint's own)."""
    layers = gm.meta.setdefault("qc_layers", {})
    # the lm_head-only pass runs first and leaves the other weights' codes to the pass after it
    codes = gm.meta.get("qc_codes", {}) if lm_head_only else gm.meta.pop("qc_codes", {})
    heads = output_linears(gm)
    done: dict[str, Node] = {}
    warned: set[str] = set()
    todo = [n for n in linear_nodes(gm) if n.args[1].op == "get_attr" and (n in heads or not lm_head_only)]
    for node in tqdm(todo, desc=f"quantize int{bits}", disable=None if progress else True, unit="layer"):
        w_node = node.args[1]
        fqn, w = w_node.target, get_constant(gm, w_node.target)
        name = layer_name(fqn)
        N, K = w.shape
        G = layer_group(group_size, K) or K
        reason = skip_reason(node, K, heads, bits, group_size, include_lm_head)
        if only_coded and fqn not in codes and fqn not in done:
            reason = "float in the checkpoint"
        elif only_coded:
            reason = None
        if reason:
            if node not in heads and reason not in warned:
                log.warning("%s: %s; such layers stay float", name, reason)
                warned.add(reason)
            # a record an earlier pass left (the lm_head's measured int8 cost) keeps its reason
            layers[name] = {"status": "float", "reason": reason, "shape": [N, K], **_role(node, heads),
                            **layers.get(name, {})}
            continue
        if fqn not in done:
            if fqn in codes:
                qw, record = codes.pop(fqn)
                G = K // qw.scales.shape[-1]
            else:
                qw = quantize_weight(w, bits, layer_group(group_size, K), symmetric,
                                     search_qparams(w, bits, G, symmetric) if clip else None)
                deq = dequantize_weight_ref(qw.qweight, qw.scales, qw.zeros, bits)
                record = {"weight_sqnr_db": round(sqnr_db(w, deq), 2)}
            prefix = constants_prefix(fqn)
            with gm.graph.inserting_before(node):
                args = [insert_constant(gm, f"{prefix}.qweight", qw.qweight),
                        insert_constant(gm, f"{prefix}.scales", qw.scales),
                        None if qw.zeros is None else insert_constant(gm, f"{prefix}.zeros", qw.zeros)]
                done[fqn] = insert_call(gm, torch.ops.qc.dequantize_weight.default, (*args, bits))
            layers[name] = {"status": "quantized", "bits": bits, "group_size": G, "symmetric": symmetric,
                            "shape": [N, K], **_role(node, heads), **layers.get(name, {}), **record}
        node.replace_input_with(w_node, done[fqn])
    assert lm_head_only or not codes, f"calibrated codes for weights no linear reads: {sorted(codes)[:3]}"
    return finish(gm)
