"""paged_attention: every causal ``scaled_dot_product_attention`` of the flat-token program
becomes ``qc.reshape_and_cache`` + ``qc.paged_attention`` over an explicit KV cache.

After ``input_ids [T]`` and ``positions [T]``, the program gains the runtime's inputs, in this order:
``kv_cache [L, 2, num_blocks, block_size, H_kv, D]``, ``slot_mapping [T]``,
``block_tables [S, max_blocks]``, ``seq_lens [S]``, ``query_start_loc [S + 1]``, and
``logits_indices [N]``: the token rows whose logits are wanted. The output projection runs on
those rows only (the last token of each sequence when serving; every token for perplexity),
so a 512-token prefill does not pay for 512 rows of a vocabulary-sized matmul.
GQA repetition (``repeat_kv``'s unsqueeze/expand/reshape, ``repeat_interleave``) is looked
through, so the cache holds KV heads only; the mask the model built goes dead and is removed.
Invariant: for any packing of sequences into steps, each token's logits equal the input
program's on that token's whole sequence (float tolerance)."""

import math

import torch
from torch.fx import GraphModule, Node
from torch.fx.graph import CodeGen

from qcompiler.codegen import attention  # noqa: F401  (registers the paged ops)
from qcompiler.codegen.fx import call_nodes, fake_mode_of, finish, insert_call

aten, qc = torch.ops.aten, torch.ops.qc
PAGED_INPUTS = ("kv_cache", "slot_mapping", "block_tables", "seq_lens", "query_start_loc", "logits_indices")
REPEAT_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
              aten.expand.default, aten.unsqueeze.default}


def _shape(n: Node):
    return tuple(n.meta["val"].shape)


def kv_heads_source(kv: Node, q: Node) -> Node:
    """The tensor ``[1, H_kv, T, D]`` that ``kv`` (``[1, H_q, T, D]``) repeats, or ``kv`` itself."""
    Hq, T, D = _shape(q)[1:]
    chain, cur, expanded = [], kv, False
    while cur.op == "call_function" and cur.target in REPEAT_OPS:
        expanded |= cur.target is aten.expand.default
        cur = cur.args[0]
        chain.append(cur)
    for node in reversed(chain if expanded else []):
        s = _shape(node)
        if len(s) == 4 and s[0] == 1 and str(s[2]) == str(T) and s[3] == D and Hq % s[1] == 0:
            return node
    return kv


def _tokens_major(gm: GraphModule, x: Node) -> Node:
    """``[1, H, T, D]`` -> ``[T, H, D]``."""
    return insert_call(gm, aten.select.int, (insert_call(gm, aten.permute.default, (x, [0, 2, 1, 3])), 0, 0))


def _plain_signature(gm: GraphModule) -> None:
    """Positional inputs and a bare tensor output, so that inputs can be added."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    (results,) = out.args
    assert isinstance(results, (tuple, list)) and len(results) == 1, f"expected one output, got {results}"
    out.args = (results[0],)
    gm.graph._codegen = CodeGen()
    gm._forward_pre_hooks.clear()  # input checks of the capture-time signature


def output_projection(gm: GraphModule) -> Node:
    """The linear (float or quantized) that produces the program's output: lm_head."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    cur = out.args[0]
    while isinstance(cur, Node) and cur.op == "call_function":
        if "linear" in getattr(cur.target, "__name__", str(cur.target)):
            return cur
        cur = cur.args[0]
    raise ValueError("no linear produces the program's output: cannot find the output projection (lm_head)")


def _select_logit_rows(gm: GraphModule, rows: Node) -> None:
    """lm_head's input ``[..., T, H]`` -> ``[..., N, H]`` at ``rows``."""
    head = output_projection(gm)
    x = head.args[0]
    with gm.graph.inserting_before(head):
        picked = insert_call(gm, aten.index_select.default, (x, x.meta["val"].dim() - 2, rows))
    head.replace_input_with(x, picked)


def paged_attention(gm: GraphModule) -> GraphModule:
    sdpas = call_nodes(gm, aten.scaled_dot_product_attention.default)
    if not sdpas:
        raise ValueError("the program has no scaled_dot_product_attention to page")
    _plain_signature(gm)
    mode = fake_mode_of(gm)
    q0 = sdpas[0].args[0]
    Hkv0 = _shape(kv_heads_source(sdpas[0].args[1], q0))[1]
    D = _shape(q0)[3]
    pos = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    dev = q0.meta["val"].device  # the metadata lives where the program was captured (CPU or CUDA)
    with mode:
        examples = {"kv_cache": torch.empty(len(sdpas), 2, 8, 16, Hkv0, D, dtype=q0.meta["val"].dtype, device=dev),
                    "slot_mapping": torch.empty_like(pos.meta["val"]),
                    "block_tables": torch.empty(2, 4, dtype=torch.int64, device=dev),
                    "seq_lens": torch.empty(2, dtype=torch.int64, device=dev),
                    "query_start_loc": torch.empty(3, dtype=torch.int64, device=dev),
                    "logits_indices": torch.empty(2, dtype=torch.int64, device=dev)}
    inputs = {}
    with gm.graph.inserting_after(pos):
        for name in reversed(PAGED_INPUTS):
            inputs[name] = gm.graph.placeholder(name)
            inputs[name].meta["val"] = examples[name]
    for layer, node in enumerate(sdpas):
        q, k, v = node.args[:3]
        kw = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"), node.args[3:]), **node.kwargs)
        if kw.get("attn_mask") is None and not kw.get("is_causal", False):
            raise ValueError(f"{node.name}: attention without a mask and not causal: not a decoder's self-attention")
        if kw.get("dropout_p", 0.0):
            raise ValueError(f"{node.name}: attention dropout {kw['dropout_p']} in an inference program")
        scale = kw.get("scale") or 1.0 / math.sqrt(_shape(q)[3])
        k, v = kv_heads_source(k, q), kv_heads_source(v, q)
        assert _shape(k)[1] == _shape(v)[1] == Hkv0, f"{node.name}: KV heads {_shape(k)[1]} differ from layer 0's {Hkv0}"
        with gm.graph.inserting_before(node):
            q3, k3, v3 = (_tokens_major(gm, t) for t in (q, k, v))
            insert_call(gm, qc.reshape_and_cache.default, (inputs["kv_cache"], layer, k3, v3, inputs["slot_mapping"]))
            o = insert_call(gm, qc.paged_attention.default,
                            (q3, inputs["kv_cache"], layer, inputs["block_tables"], inputs["seq_lens"],
                             inputs["query_start_loc"], float(scale)))
            o4 = insert_call(gm, aten.unsqueeze.default, (insert_call(gm, aten.permute.default, (o, [1, 0, 2])), 0))
        node.replace_all_uses_with(o4)
        gm.graph.erase_node(node)
    _select_logit_rows(gm, inputs["logits_indices"])
    gm.meta["qc_paged"] = {"num_layers": len(sdpas), "num_kv_heads": Hkv0, "head_dim": D}
    return finish(gm)
