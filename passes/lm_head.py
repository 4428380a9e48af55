"""quantize_lm_head_if_cheap: the output projection in int8 per channel when that costs at most
``max_increase`` of perplexity on the calibration samples, else float.

The cost is measured on the head alone: the samples run through the program up to the head's
input (``calibrate.propagate``, which stops there), and the next-token cross entropy of the float
head's logits is compared with that of the int8 head's (``dequantize(quantize(W))``, the scheme's
reference) on the same hidden states: ``exp(CE_int8 - CE_float) - 1``. The figure goes into the
head's layer record (``perplexity_increase``) either way; quantized, the head keeps the codes
measured (handed to ``quantize_weights(lm_head_only=True)`` as a calibrated method hands its own)."""
import math
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from qcompiler.codegen.fx import get_constant
from qcompiler.codegen.quant import dequantize_weight_ref, quantize_weight, sqnr_db

from .calibrate import LinearGroup, is_constant_linear, propagate
from .quantize_weights import layer_name, output_linears, quantize_weights

MAX_SAMPLES = 8  # calibration windows the measure uses (a paired comparison: few suffice)


def head_perplexity_increase(gm: GraphModule, head: Node, samples: list[torch.Tensor], w: torch.Tensor,
                             wq: torch.Tensor) -> float:
    """``exp(CE(wq) - CE(w)) - 1`` of the output projection ``head`` over ``samples``' next tokens,
    with its weight ``w`` and the quantized ``wq`` in its place (fp32)."""
    inputs: list[torch.Tensor] = []
    propagate(gm, samples[:MAX_SAMPLES], [LinearGroup(head.args[0], [head])],
              lambda group, xs: inputs.extend(xs), desc="lm_head cost")
    bias = head.args[2] if len(head.args) > 2 else None
    b = None if bias is None else get_constant(gm, bias.target).float()
    ce = {"float": 0.0, "int": 0.0}
    n = 0
    with torch.no_grad():
        for x, ids in zip(inputs, samples):
            x = x.reshape(-1, x.shape[-1]).float()[:-1]
            target = ids.reshape(-1)[1:]
            for key, weight in (("float", w), ("int", wq)):
                ce[key] += torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, weight, b), target,
                                                             reduction="sum").item()
            n += target.numel()
    return math.exp((ce["int"] - ce["float"]) / max(n, 1)) - 1


def quantize_lm_head_if_cheap(gm: GraphModule, *, samples: Optional[list[torch.Tensor]], max_increase: float,
                              bits: int = 8) -> GraphModule:
    heads = [n for n in output_linears(gm) if is_constant_linear(n)]
    layers = gm.meta.setdefault("qc_layers", {})
    inc = None  # measured only for a single constant-weight head, with data
    if len(heads) == 1 and samples:
        fqn = heads[0].args[1].target
        w = get_constant(gm, fqn)
        qw = quantize_weight(w, bits, None, True)
        deq = dequantize_weight_ref(qw.qweight, qw.scales, qw.zeros, bits)
        inc = head_perplexity_increase(gm, heads[0], samples, w.float(), deq.float())
    for head in heads:
        name = layer_name(head.args[1].target)
        layers[name] = {**layers.get(name, {}), "perplexity_increase": None if inc is None else round(inc, 6)}
        if inc is None or inc > max_increase:
            layers[name]["reason"] = ("no calibration data to measure an int8 lm_head's cost" if inc is None else
                                      f"int{bits} would cost {inc:.2%} perplexity on the calibration data "
                                      f"(limit {max_increase:.1%})")
    if inc is None or inc > max_increase:
        return gm
    # the codes measured, as a calibrated method leaves its codes for quantize_weights
    gm.meta.setdefault("qc_codes", {})[fqn] = (qw, {"weight_sqnr_db": round(sqnr_db(w, deq), 2)})
    return quantize_weights(gm, bits=bits, group_size=None, symmetric=True, include_lm_head=True, lm_head_only=True)
