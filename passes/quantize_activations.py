"""quantize_w8a8 / quantize_fp8: linears whose activations are quantized too.

W8A8: int8 weights per output channel (symmetric, ``absmax / 127.5`` with codes in [-128, 127]
as llm-compressor does, or GPTQ's codes when a GPTQ pass left them), int8 activations per token
at run time, or per tensor with a static scale from an observer over the calibration data.
FP8: e4m3 weights per output channel, e4m3 activations with dynamic per-token scales.
Each such ``aten.linear`` becomes one ``qc.w8a8_linear`` / ``qc.fp8_linear`` node.
Invariant: outputs equal the float program with weights and activations fake-quantized the
same way (the ops' ``*_ref``)."""
from typing import Optional

import torch
from torch import Tensor
from torch.fx import GraphModule

from qcompiler.codegen import act_quant  # noqa: F401  (registers the ops)
from qcompiler.codegen.act_quant import quantize_weight_fp8
from qcompiler.codegen.fx import finish, get_constant, insert_call, insert_constant
from qcompiler.codegen.quant import compute_qparams, quantize, sqnr_db

from .calibrate import input_rows, is_constant_linear, linear_groups, propagate
from .quantize_weights import constants_prefix, layer_name, output_linears

qc = torch.ops.qc
INT8_MAX = 127.0


# --- observers: one static activation scale per tensor ------------------------------------

def _hist_absmax(x: Tensor, quantile: float) -> float:
    flat = x.abs().flatten()
    k = max(1, int(round(quantile * flat.numel())))
    return float(flat.kthvalue(k).values)


def observe_scale(x: Tensor, observer: str) -> float:
    """Static int8 scale for activations ``x [tokens, K]``: ``minmax`` (absmax / 127),
    ``percentile`` (the 99.99th percentile of |x|, outliers clipped), ``mse`` (the clipping
    threshold among 100 candidates minimizing the quantization error on ``x``)."""
    absmax = float(x.abs().max())
    if observer == "minmax":
        clip = absmax
    elif observer == "percentile":
        clip = _hist_absmax(x, 0.9999)
    elif observer == "mse":
        sub = x.flatten()[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:1 << 20]]
        best = (float("inf"), absmax)
        for f in torch.linspace(0.05, 1.0, 100).tolist():
            s = absmax * f / INT8_MAX
            err = float(((sub / s).round().clamp(-INT8_MAX, INT8_MAX) * s - sub).pow(2).mean())
            best = min(best, (err, absmax * f))
        clip = best[1]
    else:
        raise ValueError(f"unknown observer {observer!r}")
    return max(clip, 1e-8) / INT8_MAX


def static_input_scales(gm: GraphModule, samples: list[Tensor], observer: str, eligible,
                        progress: bool = False) -> dict:
    """``{input node: scale}`` for every group of eligible linears, observed on calibration data."""
    scales = {}

    def hook(group, inputs):
        scales[group.x] = observe_scale(input_rows(inputs), observer)

    propagate(gm, samples, linear_groups(gm, eligible), hook, desc=f"observe ({observer})", progress=progress)
    return scales


# --- the rewrites ---------------------------------------------------------------------------

def _eligible(gm: GraphModule, include_lm_head: bool):
    heads = output_linears(gm)
    return lambda n: include_lm_head or n not in heads


def _rewrite(gm: GraphModule, include_lm_head: bool, make) -> GraphModule:
    """``make(node, w) -> (op, constants before the bias, constants after it, record)`` for each
    eligible constant linear: ``op(x, *before, bias, *after)``; a None constant is passed as None."""
    layers = gm.meta.setdefault("qc_layers", {})
    ok, heads = _eligible(gm, include_lm_head), output_linears(gm)
    for node in [n for n in gm.graph.nodes if is_constant_linear(n)]:
        fqn = node.args[1].target
        w = get_constant(gm, fqn)
        name = layer_name(fqn)
        if not ok(node):
            layers[name] = {"status": "float", "reason": "output projection (lm_head) kept float unless asked",
                            "shape": list(w.shape), "role": "lm_head"}
            continue
        op, consts, tail, record = make(node, w)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with gm.graph.inserting_before(node):
            put = lambda k, v: None if v is None else insert_constant(gm, f"{constants_prefix(fqn)}.{k}", v)  # noqa: E731
            args = [put(k, v) for k, v in consts.items()]
            new = insert_call(gm, op, (node.args[0], *args, bias, *[put(k, v) for k, v in tail.items()]))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        layers[name] = {"status": "quantized", "shape": list(w.shape), **layers.get(name, {}), **record,
                        **({"role": "lm_head"} if node in heads else {})}
    return finish(gm)


def quantize_w8a8(gm: GraphModule, samples: Optional[list[Tensor]] = None, *, observer: Optional[str] = None,
                  include_lm_head: bool = False, progress: bool = False) -> GraphModule:
    """``observer``: static per-tensor activation scales observed on ``samples``; None: dynamic."""
    codes = gm.meta.pop("qc_codes", {})
    input_scales = {}
    if observer is not None:
        assert samples, "static activation scales need calibration samples"
        input_scales = static_input_scales(gm, samples, observer, _eligible(gm, include_lm_head), progress)

    def make(node, w):
        fqn = node.args[1].target
        if fqn in codes:
            qw, record = codes.pop(fqn)
            q, scale = qw.qweight, qw.scales
        else:
            scale, _ = compute_qparams(w, 8, w.shape[1], symmetric=True)
            q = quantize(w, scale, None, 8, w.shape[1])
            record = {}
        scale = scale.float().reshape(-1, 1)
        w_hat = q.float() * scale
        record = {"bits": 8, "activations": "int8", "weight_sqnr_db": round(sqnr_db(w, w_hat), 2), **record}
        s = input_scales.get(node.args[0])  # None: dynamic per-token scales
        if s is not None:
            record["input_scale"] = s
        tail = {"input_scale": None if s is None else torch.tensor(s, dtype=torch.float32)}
        return qc.w8a8_linear.default, {"qweight": q, "weight_scale": scale}, tail, record

    out = _rewrite(gm, include_lm_head, make)
    assert not codes, f"calibrated codes for weights no linear reads: {sorted(codes)[:3]}"
    return out


def quantize_fp8(gm: GraphModule, *, include_lm_head: bool = False, progress: bool = False) -> GraphModule:
    """Per-channel e4m3 weights by RTN, or the codes a calibration pass (``gptq(fp8=True)``) left."""
    codes = gm.meta.pop("qc_codes", {})

    def make(node, w):
        fqn = node.args[1].target
        if fqn in codes:
            qw, record = codes.pop(fqn)
            q, scale = qw.qweight, qw.scales.float().reshape(-1, 1)
        else:
            (q, scale), record = quantize_weight_fp8(w), {}
        w_hat = q.float() * scale
        record = {"format": "float8_e4m3fn", "activations": "fp8 per-token", "weight_sqnr_db": round(sqnr_db(w, w_hat), 2),
                  **record}
        return qc.fp8_linear.default, {"qweight": q, "weight_scale": scale}, {}, record

    out = _rewrite(gm, include_lm_head, make)
    assert not codes, f"calibrated codes for weights no linear reads: {sorted(codes)[:3]}"
    return out
