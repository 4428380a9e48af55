"""checkpoint_codes: a quantized checkpoint's own codes for the linears that read its weights,
left in ``gm.meta["qc_codes"]`` as a calibrated method leaves its codes, so that the quantize
pass after it keeps them as they are. The graph's weights are what those codes decode to."""
from torch.fx import GraphModule

from .quantize_weights import layer_name, linear_nodes, output_linears


def checkpoint_codes(gm: GraphModule, codes: dict, every_linear: bool = False) -> GraphModule:
    """``codes``: module name -> ``QuantizedWeight``. ``every_linear``: the target quantizes every
    linear but the output projection (W8A8, FP8), so a linear without codes is refused."""
    heads, found = output_linears(gm), {}
    for node in linear_nodes(gm):
        w_node = node.args[1]
        if w_node.op != "get_attr":
            continue
        name = layer_name(w_node.target)
        if name in codes:
            found[w_node.target] = (codes[name], {"source": "checkpoint"})
        elif every_linear and node not in heads:
            raise ValueError(f"{name} is float in the checkpoint, and this scheme quantizes every linear but the "
                             "output projection: pass --requantize to quantize it again from the decoded weights")
    unused = sorted(set(codes) - {layer_name(f) for f in found})
    if unused:
        raise ValueError(f"the checkpoint has codes for {unused[:3]}, which no linear of the captured program reads")
    gm.meta["qc_codes"] = found
    return gm
