"""paged_attention: every causal attention of the flat-token program becomes
``qc.reshape_and_cache`` + ``qc.paged_attention`` over an explicit KV cache. Attention is a
``scaled_dot_product_attention`` node or its eager form, ``softmax(f(q @ k^T) + mask) @ v`` written
out (transformers' eager attention, hand-written models): ``f`` scalar scales, optionally around a
``tanh`` (score soft-capping, ``softcap * tanh(s / softcap)``), the mask added or applied with
``where``/``masked_fill``. A softmax over ``[1, H, T, T]`` scores that is not of that form (attention
sinks concatenated to the scores, a per-head bias, ...) is refused, naming the layer and the op.

After ``input_ids [T]`` and ``positions [T]``, the program gains the runtime's inputs, in this order:
``kv_cache [L, 2, num_blocks, block_size, H_kv, D]``, ``slot_mapping [T]``,
``block_tables [S, max_blocks]``, ``seq_lens [S]``, ``query_start_loc [S + 1]``, and
``logits_indices [N]``: the token rows whose logits are wanted. The output projection runs on
those rows only (the last token of each sequence when serving; every token for perplexity),
so a 512-token prefill does not pay for 512 rows of a vocabulary-sized matmul.
GQA repetition (``repeat_kv``'s unsqueeze/expand/reshape, ``repeat_interleave``) is looked
through, so the cache holds KV heads only. The mask the model built is recognized by what it
computes, not by how: its subgraph is run on positions ``0..T-1`` and must equal the causal mask or
a causal sliding window (``window``, taken from the result); anything else is refused, naming the
layer. The mask then goes dead and is removed.
Invariant: for any packing of sequences into steps, each token's logits equal the input
program's on that token's whole sequence (float tolerance)."""

import math

import torch
from torch.fx import GraphModule, Node
from dataclasses import dataclass
from typing import Optional

from torch.fx.graph import CodeGen

from qcompiler.codegen import attention  # noqa: F401  (registers the paged ops)
from qcompiler.codegen.fx import fake_mode_of, finish, insert_call

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


MAX_MASK_PROBE = 8192  # longest probe a mask is evaluated on: windows up to this are recognized


def _subgraph_module(gm: GraphModule, out: Node) -> GraphModule:
    """The nodes ``out`` depends on (placeholders included) as a module of their own."""
    needed, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    g, env = torch.fx.Graph(), {}
    for n in gm.graph.nodes:
        if n in needed:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[out])
    return GraphModule(gm, g)


def _int_constants(sub: GraphModule) -> list[int]:
    vals = []
    for n in sub.graph.nodes:
        for a in (*n.args, *n.kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and 1 < abs(a) < 1 << 20:
                vals.append(abs(a))
    return vals


def mask_window(gm: GraphModule, mask: Node, where: str) -> int:
    """What the attention mask ``mask`` computes: 0 for causal, ``w > 0`` for a causal sliding window
    of ``w`` keys (the query at ``p`` sees ``p - w < j <= p``). The mask's subgraph runs on ``T``
    tokens at positions ``0..T-1``, ``T`` past every integer constant in it (a window's size is
    one), up to ``MAX_MASK_PROBE``; any other pattern raises ``ValueError`` naming ``where``."""
    sub = _subgraph_module(gm, mask)
    T = min(max([62, *_int_constants(sub)]) + 2, MAX_MASK_PROBE)
    args = []
    for n in sub.graph.nodes:
        if n.op == "placeholder":
            v = n.meta.get("val")
            args.append(torch.arange(T, device=v.device) if v is not None and v.dtype == torch.int64
                        else torch.zeros(T, dtype=getattr(v, "dtype", torch.float32), device=v.device))
    with torch.no_grad():
        m = sub(*args)
    m = torch.broadcast_to(m, (*m.shape[:-2], T, T)).reshape(-1, T, T)
    allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    if not bool((allowed == allowed[:1]).all()):
        raise ValueError(f"{where}: its attention mask differs between batch rows or heads: the paged rewrite "
                         "cannot reproduce it")
    if m.dtype != torch.bool and bool((m[allowed] != 0).any()):
        raise ValueError(f"{where}: its attention mask adds a bias to the scores (ALiBi-style): the paged rewrite "
                         "cannot reproduce it")
    allowed = allowed[0]
    i, j = torch.arange(T, device=m.device)[:, None], torch.arange(T, device=m.device)[None, :]
    causal = j <= i
    if torch.equal(allowed, causal):
        return 0
    w = int(allowed[-1].sum())
    if 0 < w < T and torch.equal(allowed, causal & (j > i - w)):
        return w
    raise ValueError(f"{where}: its attention mask is neither causal nor a causal sliding window (checked on {T} "
                     "positions): the paged rewrite cannot reproduce it")


@dataclass
class Site:
    """One attention: ``out [1, H_q, T, D]`` from ``q``, ``k``, ``v`` (``[1, H, T, D]``, k and v
    possibly repeated to H_q heads), its mask (None: ``is_causal``), softmax scale and soft-cap."""
    out: Node
    q: Node
    k: Node
    v: Node
    mask: Optional[Node]
    scale: Optional[float]
    softcap: float = 0.0
    dropout: float = 0.0


SOFTMAXES = (aten._softmax.default, aten.softmax.int)
PASS_THROUGH = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
                aten.clone.default, aten._to_copy.default, aten.contiguous.default}


def _through(n: Node) -> Node:
    """``n`` with views, expands, copies and dtype casts looked through, back to its 4-D source."""
    while n.op == "call_function" and n.target in PASS_THROUGH and not (len(_shape(n)) == 4 and _shape(n)[0] == 1
                                                                          and n.target is not aten.expand.default):
        n = n.args[0]
    return n


def _is_transpose_of_last(n: Node) -> bool:
    if n.target is aten.transpose.int:
        return sorted(d % 4 for d in n.args[1:3]) == [2, 3]
    return n.target is aten.permute.default and list(n.args[1]) in ([0, 1, 3, 2], [0, 1, -1, -2])


def _activation_free(n: Node) -> bool:
    """Whether ``n`` is computed from positions and constants only (a mask), not from the tokens'
    activations (no matmul, linear or embedding on its way)."""
    seen, stack = set(), [n]
    while stack:
        c = stack.pop()
        if c in seen:
            continue
        seen.add(c)
        if c.op == "call_function" and c.target in (aten.bmm.default, aten.mm.default, aten.linear.default,
                                                    aten.embedding.default, aten.addmm.default):
            return False
        stack.extend(c.all_input_nodes)
    return True


def _is_fill(a) -> bool:
    """A scalar (or a constant-filled tensor node) that drives a score to -inf: -inf or below -1e30."""
    if isinstance(a, Node) and a.op == "call_function" and a.target in (aten.full.default, aten.scalar_tensor.default):
        a = a.args[1] if a.target is aten.full.default else a.args[0]
    if isinstance(a, Node) and a.op == "call_function" and a.target is aten.lift_fresh_copy.default:
        a = a.args[0]
    return isinstance(a, (int, float)) and a < -1e30


def _ancestors(n: Node, depth: int) -> list[Node]:
    out, frontier = [n], [n]
    for _ in range(depth):
        frontier = [a for f in frontier for a in f.all_input_nodes]
        out += frontier
    return out


def eager_site(gm: GraphModule, softmax: Node, where: str) -> Optional[Site]:
    """The attention ``softmax`` ends, or None when its input is not 4-D (a router's softmax, say):
    a 4-D softmax over the last dim is taken for attention. Raises ``ValueError`` naming ``where`` and
    the op for scores it cannot reproduce."""
    x = softmax.args[0]
    if softmax.args[1] not in (-1, 3) or len(_shape(x)) != 4:
        return None
    pre, post, tanh, mask, scaled = 1.0, 1.0, False, None, False
    cur = x
    while cur.op == "call_function":
        t, a = cur.target, cur.args
        if t is aten._to_copy.default:
            cur = a[0]
        elif t in (aten.mul.Tensor, aten.div.Tensor) and isinstance(a[1], (int, float)):
            f = a[1] if t is aten.mul.Tensor else 1.0 / a[1]
            post, pre = (post * f, pre) if not tanh else (post, pre * f)
            scaled, cur = True, a[0]
        elif t is aten.tanh.default and not tanh:
            tanh, scaled, cur = True, True, a[0]
        elif t is aten.add.Tensor and isinstance(a[1], Node) and not scaled and mask is None:
            score_side = [n for n in a[:2] if not _activation_free(n)]
            if len(score_side) != 1:
                break
            mask = a[1] if score_side[0] is a[0] else a[0]
            cur = score_side[0]
        elif t is aten.where.self and not scaled and mask is None and len(_shape(cur)) == 4:
            cond, yes, no = a
            if _is_fill(yes) and isinstance(no, Node) and not _activation_free(no):
                with gm.graph.inserting_before(softmax):
                    mask = insert_call(gm, aten.logical_not.default, (cond,))
                cur = no
            elif _is_fill(no) and isinstance(yes, Node) and not _activation_free(yes):
                mask, cur = cond, yes
            else:
                break
        else:
            break
    qk = cur
    while qk.op == "call_function" and qk.target in PASS_THROUGH:
        qk = qk.args[0]
    if qk.target is not aten.bmm.default:
        if any(n.target is aten.cat.default for n in _ancestors(cur, 4)):
            raise ValueError(f"{where}: values are concatenated to the attention scores before the softmax (aten.cat: "
                             "attention sinks): the paged rewrite cannot reproduce it")
        raise ValueError(f"{where}: the attention scores pass through {cur.target} before the softmax, not a scale, "
                         "tanh soft-cap or mask: the paged rewrite cannot reproduce it")
    q, kt = _through(qk.args[0]), _through(qk.args[1])
    if not _is_transpose_of_last(kt) or len(_shape(q)) != 4:
        raise ValueError(f"{where}: softmax over scores that are not q @ k^T of [1, heads, tokens, head_dim] "
                         "queries and keys: the paged rewrite cannot reproduce it")
    k = kt.args[0]
    # the probabilities' way to ``@ v``: casts, copies, dropout (identity here), views, a bmm
    users, p = list(softmax.users), softmax
    while len(users) == 1 and users[0].target in PASS_THROUGH | {aten.dropout.default}:
        p = users[0]
        users = list(p.users)
    if len(users) != 1 or users[0].target is not aten.bmm.default or users[0].args[0] is not p:
        raise ValueError(f"{where}: the attention probabilities are used other than as `probabilities @ v`: "
                         "the paged rewrite cannot reproduce it")
    pv = users[0]
    v = _through(pv.args[1])
    outs = [u for u in pv.users]
    want = [str(d) for d in (*_shape(q)[:3], _shape(v)[-1])]
    if len(outs) != 1 or outs[0].target not in PASS_THROUGH or [str(d) for d in _shape(outs[0])] != want:
        raise ValueError(f"{where}: the attention output is not reshaped back to [1, heads, tokens, head_dim]")
    softcap = post if tanh else 0.0
    return Site(out=outs[0], q=q, k=k, v=v, mask=mask, scale=pre * post, softcap=softcap)


def sdpa_site(node: Node) -> Site:
    q, k, v = node.args[:3]
    kw = dict(zip(("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"), node.args[3:]), **node.kwargs)
    mask = kw.get("attn_mask")
    if mask is None and not kw.get("is_causal", False):
        raise ValueError(f"{node.name}: attention without a mask and not causal: not a decoder's self-attention")
    if mask is not None and kw.get("is_causal", False):
        raise ValueError(f"{node.name}: attention with both a mask and is_causal")
    return Site(out=node, q=q, k=k, v=v, mask=mask, scale=kw.get("scale"), dropout=kw.get("dropout_p", 0.0))


def attention_sites(gm: GraphModule) -> list[Site]:
    """Every attention of the program, in graph order: SDPA nodes and eager softmax attentions."""
    sites = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.scaled_dot_product_attention.default:
            sites.append(sdpa_site(node))
        elif node.target in SOFTMAXES:
            site = eager_site(gm, node, f"layer {len(sites)} ({node.name})")
            if site is not None:
                sites.append(site)
    return sites


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
    sites = attention_sites(gm)
    if not sites:
        raise ValueError("the program has no attention to page: neither scaled_dot_product_attention nor "
                         "softmax(q @ k^T) @ v")
    _plain_signature(gm)
    mode = fake_mode_of(gm)
    q0 = sites[0].q
    Hkv0 = _shape(kv_heads_source(sites[0].k, q0))[1]
    D = _shape(q0)[3]
    pos = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    dev = q0.meta["val"].device  # the metadata lives where the program was captured (CPU or CUDA)
    with mode:
        examples = {"kv_cache": torch.empty(len(sites), 2, 8, 16, Hkv0, D, dtype=q0.meta["val"].dtype, device=dev),
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
    windows, softcaps, seen = [], [], {}
    for layer, site in enumerate(sites):
        node, q, k, v, mask = site.out, site.q, site.k, site.v, site.mask
        if mask is not None and mask not in seen:
            seen[mask] = mask_window(gm, mask, f"layer {layer} ({node.name})")
        window = seen[mask] if mask is not None else 0
        windows.append(window)
        softcaps.append(site.softcap)
        if site.dropout:
            raise ValueError(f"{node.name}: attention dropout {site.dropout} in an inference program")
        scale = site.scale or 1.0 / math.sqrt(_shape(q)[3])
        k, v = kv_heads_source(k, q), kv_heads_source(v, q)
        assert _shape(k)[1] == _shape(v)[1] == Hkv0, f"{node.name}: KV heads {_shape(k)[1]} differ from layer 0's {Hkv0}"
        with gm.graph.inserting_before(node):
            q3, k3, v3 = (_tokens_major(gm, t) for t in (q, k, v))
            insert_call(gm, qc.reshape_and_cache.default, (inputs["kv_cache"], layer, k3, v3, inputs["slot_mapping"]))
            o = insert_call(gm, qc.paged_attention.default,
                            (q3, inputs["kv_cache"], layer, inputs["block_tables"], inputs["seq_lens"],
                             inputs["query_start_loc"], float(scale),
                             *([window, float(site.softcap)] if site.softcap else
                               [window] if window else [])))
            o4 = insert_call(gm, aten.unsqueeze.default, (insert_call(gm, aten.permute.default, (o, [1, 0, 2])), 0))
        node.replace_all_uses_with(o4)
        gm.graph.erase_node(node)
    _select_logit_rows(gm, inputs["logits_indices"])
    gm.meta["qc_paged"] = {"num_layers": len(sites), "num_kv_heads": Hkv0, "head_dim": D,
                           **({"windows": windows} if any(windows) else {}),
                           **({"softcaps": softcaps} if any(softcaps) else {})}
    return finish(gm)
