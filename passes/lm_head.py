"""quantize_lm_head_if_cheap: the output projection in int8 per channel when that costs at most
``max_increase`` of perplexity on the calibration samples, else float.

The cost is measured on the head alone: the samples run through the program up to the head's
input (``calibrate.propagate``, which stops there), and the next-token cross entropy of the float
head's logits is compared with that of the int8 head's (``dequantize(quantize(W))``, the scheme's
reference) on the same hidden states: ``exp(CE_int8 - CE_float) - 1``. The figure goes into the
head's layer record (``perplexity_increase``) either way; quantized, the head is what
``quantize_weights(lm_head_only=True)`` makes of it."""
import math
from typing import Optional

import torch
from torch.fx import GraphModule

from qcompiler.codegen.fx import get_constant
from qcompiler.codegen.quant import dequantize_weight_ref, quantize_weight

from .calibrate import LinearGroup, is_constant_linear, propagate
from .quantize_weights import layer_name, output_linears, quantize_weights

MAX_SAMPLES = 8  # calibration windows the measure uses (a paired comparison: few suffice)


def head_perplexity_increase(gm: GraphModule, samples: list[torch.Tensor], bits: int = 8) -> Optional[float]:
    """``exp(CE_int{bits} - CE_float) - 1`` of the output projection over ``samples``' next
    tokens, or None when the program has no single constant-weight head."""
    heads = [n for n in output_linears(gm) if is_constant_linear(n)]
    if len(heads) != 1 or not samples:
        return None
    head = heads[0]
    inputs: list[torch.Tensor] = []
    propagate(gm, samples[:MAX_SAMPLES], [LinearGroup(head.args[0], [head])],
              lambda group, xs: inputs.extend(xs), desc="lm_head cost")
    w = get_constant(gm, head.args[1].target).float()
    bias = head.args[2] if len(head.args) > 2 else None
    b = None if bias is None else get_constant(gm, bias.target).float()
    qw = quantize_weight(w, bits, None, True)
    wq = dequantize_weight_ref(qw.qweight, qw.scales, qw.zeros, bits).float()
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
    inc = head_perplexity_increase(gm, samples or [], bits)
    heads = output_linears(gm)
    layers = gm.meta.setdefault("qc_layers", {})
    for head in heads:
        if is_constant_linear(head):
            name = layer_name(head.args[1].target)
            layers[name] = {**layers.get(name, {}), "perplexity_increase": None if inc is None else round(inc, 6)}
    if inc is None or inc > max_increase:
        for head in heads:
            if is_constant_linear(head):
                why = ("no calibration data to measure an int8 lm_head's cost" if inc is None else
                       f"int{bits} would cost {inc:.2%} perplexity on the calibration data (limit {max_increase:.1%})")
                layers[layer_name(head.args[1].target)]["reason"] = why
        return gm
    return quantize_weights(gm, bits=bits, group_size=None, symmetric=True, include_lm_head=True, lm_head_only=True)
