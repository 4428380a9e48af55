"""gptq: weights quantized with GPTQ's error compensation, calibrated layer by layer.

The calibration samples run through the program (``passes.calibrate.propagate``); at each group
of linears reading one input, the Hessian ``XᵀX`` of that input over every calibration token
is formed once and shared by the group, each weight is quantized by ``quantization.gptq_quantize``, and its
dequantized value replaces it at once, so the layers after it are calibrated on quantized
outputs. The codes go to ``gm.meta["qc_codes"]``, which ``quantize_weights`` stores as they are.
Memory: one Hessian ``[K, K]`` and one layer's activations per sample at a time."""

import torch
from torch.fx import GraphModule

from qcompiler.codegen.act_quant import quantize_weight_fp8
from qcompiler.codegen.fx import get_constant, set_constant
from qcompiler.codegen.quant import dequantize_weight_ref, sqnr_db

from .calibrate import input_rows, linear_groups, propagate
from .quantization import fake_quantize, gptq_quantize
from .quantize_weights import GroupSize, layer_group, quantizable

MSE_ROWS = 4096  # calibration tokens the per-layer output error is measured on


def output_mse(x, w, w_hat) -> float:
    """Mean squared error of the layer's output on calibration rows ``x [R, K]`` (recorded per layer
    beside RTN's on the same rows)."""
    return float((x @ (w_hat.float() - w.float()).t()).pow(2).mean())


def gptq(gm: GraphModule, samples: list[torch.Tensor], *, bits: int, group_size: GroupSize, symmetric: bool,
         act_order: bool = False, clip: bool = False, fp8: bool = False, include_lm_head: bool = False,
         damp: float = 0.01, progress: bool = False) -> GraphModule:
    """``clip``: every group's range is the one ``quantization.clip_ratios`` picks on this Hessian.
    NOTE: the clipped ranges are taken as they are, never compared per weight with min-max by the
    GPTQ loss: the damped calibration loss is a poor judge between the two. ``fp8``: float8 e4m3
    per-channel codes (``bits=8, group_size=None, symmetric=True``) for ``quantize_fp8``; otherwise
    integer codes for ``quantize_weights`` / ``quantize_w8a8``."""
    codes = gm.meta.setdefault("qc_codes", {})
    groups = linear_groups(gm, quantizable(gm, bits, group_size, include_lm_head))

    def hook(group, inputs):
        x = input_rows(inputs)       # [tokens, K]
        h = x.t() @ x                # [K, K]
        rows = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:MSE_ROWS]]
        for name in group.weight_names():
            if name in codes:        # a weight read by two groups: quantized once
                continue
            w = get_constant(gm, name)
            G = layer_group(group_size, w.shape[1])
            res = gptq_quantize(w, h, bits, G, symmetric, act_order=act_order, clip=clip, fp8=fp8,
                                damp=damp)
            qw = res.weight
            if fp8:
                w_hat = (qw.qweight.float() * qw.scales).to(w.dtype)
                q, s = quantize_weight_fp8(w)
                w_rtn = q.float() * s
            else:
                w_hat = dequantize_weight_ref(qw.qweight, qw.scales, qw.zeros, bits).to(w.dtype)
                w_rtn = fake_quantize(w.float(), bits, G, symmetric)
            codes[name] = (qw, {"method": "gptq", "weight_sqnr_db": round(sqnr_db(w, w_hat), 2),
                                "output_mse": output_mse(rows, w, w_hat), "rtn_output_mse": output_mse(rows, w, w_rtn),
                                "gptq_loss": float(res.loss)})
            set_constant(gm, name, w_hat)
        return None

    propagate(gm, samples, groups, hook, desc="gptq", progress=progress)
    return gm
