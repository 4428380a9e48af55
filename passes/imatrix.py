"""imatrix: RTN codes with importance-weighted ranges (llama.cpp's importance matrix).

The calibration samples run through the float program (``passes.calibrate.propagate``); at each
group of linears reading one input, the mean squared input of every channel over all calibration
tokens (the diagonal of ``XᵀX / tokens``) weighs the rounding error of each weight's groups, and
``quantization.weighted_qparams`` picks each group's scale and zero point by it. Weights stay float
while calibrating (the statistics are the float model's); the codes go to ``gm.meta["qc_codes"]``,
which ``quantize_weights`` stores as they are. Memory: one layer's activations per sample."""
import torch
from torch.fx import GraphModule

from qcompiler.codegen.fx import get_constant
from qcompiler.codegen.quant import dequantize_weight_ref, quantize_weight, sqnr_db

from .calibrate import input_rows, linear_groups, propagate
from .gptq import MSE_ROWS, output_mse
from .quantization import fake_quantize, weighted_qparams
from .quantize_weights import GroupSize, layer_group, quantizable


def imatrix(gm: GraphModule, samples: list[torch.Tensor], *, bits: int, group_size: GroupSize, symmetric: bool,
            include_lm_head: bool = False, progress: bool = False) -> GraphModule:
    codes = gm.meta.setdefault("qc_codes", {})
    groups = linear_groups(gm, quantizable(gm, bits, group_size, include_lm_head))

    def hook(group, inputs):
        x = input_rows(inputs)                      # [tokens, K]
        importance = x.square().mean(0)             # [K]
        rows = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:MSE_ROWS]]
        for name in group.weight_names():
            if name in codes:                       # a weight read by two groups: quantized once
                continue
            w = get_constant(gm, name)
            G = layer_group(group_size, w.shape[1]) or w.shape[1]
            qw = quantize_weight(w, bits, G, symmetric, weighted_qparams(w, importance, bits, G, symmetric))
            w_hat = dequantize_weight_ref(qw.qweight, qw.scales, qw.zeros, bits)
            w_rtn = fake_quantize(w.float(), bits, G, symmetric)
            codes[name] = (qw, {"method": "imatrix", "weight_sqnr_db": round(sqnr_db(w, w_hat), 2),
                                "output_mse": output_mse(rows, w, w_hat), "rtn_output_mse": output_mse(rows, w, w_rtn)})
        return None

    propagate(gm, samples, groups, hook, desc="imatrix", progress=progress)
    return gm
