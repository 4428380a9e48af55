"""Calibration machinery shared by GPTQ, AWQ and SmoothQuant: groups of linears that read
one input, where a per-input-channel scale can be folded, and a sequential runner.

``propagate`` runs every calibration sample through the float program node by node, all
samples advancing together. When it reaches a group of linears, it hands the group's inputs
(one ``[..., T, K]`` tensor per sample) to the method, which may change the group's weights
(GPTQ's quantized ones, AWQ's scaled ones) and rescale the inputs before the linears run, so
every later layer is calibrated on what the earlier layers really produce (GPTQ's "true
sequential"). Weights are read at each use, never cached, so changes take effect at once;
a value is freed after its last use, so memory stays at one layer's activations per sample."""
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor
from torch.fx import GraphModule, Node
from tqdm import tqdm

from qcompiler.codegen.fx import get_constant, set_constant

aten = torch.ops.aten


class LinearGroup(NamedTuple):
    x: Node              # the input every linear of the group reads
    linears: list[Node]  # aten.linear nodes with constant weights, in graph order

    def weight_names(self) -> list[str]:
        return [n.args[1].target for n in self.linears]


def _bias(linear: Node) -> Optional[Node]:
    return linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")


def is_constant_linear(n: Node) -> bool:
    if n.op != "call_function" or n.target is not aten.linear.default or n.args[1].op != "get_attr":
        return False
    b = _bias(n)
    return b is None or b.op == "get_attr"


def linear_groups(gm: GraphModule, eligible: Callable[[Node], bool]) -> list[LinearGroup]:
    """Eligible constant-weight linears grouped by the input they read (q/k/v, gate/up)."""
    groups: dict[Node, list[Node]] = {}
    for n in gm.graph.nodes:
        if is_constant_linear(n) and eligible(n):
            groups.setdefault(n.args[0], []).append(n)
    return [LinearGroup(x, ls) for x, ls in groups.items()]


# --- where 1/s can go: x' = x / s keeps x' (W·diag(s))ᵀ = x Wᵀ ------------------------------

class Site(NamedTuple):
    kind: str                # "norm": a norm's weight [K]; "linear": the rows of the linear producing x
    weight: str              # the constant divided by s
    bias: Optional[str] = None


def _single_use_constant(gm: GraphModule, n: Node) -> bool:
    readers = [m for m in gm.graph.nodes if m.op == "get_attr" and m.target == n.target]
    return n.op == "get_attr" and len(readers) == 1 and len(n.users) == 1


def smoothing_site(gm: GraphModule, group: LinearGroup) -> Optional[Site]:
    """Where the group's input can absorb a per-channel ``1/s``, or None. Only when every user
    of the input is in the group (nothing else may see the rescaled values):
      * ``x = w_norm * y`` with ``w_norm`` a 1-D constant (RMSNorm/LayerNorm's weight);
      * ``x = a * u`` with ``u`` a linear read only here (``act(gate) * up`` -> up's rows)."""
    x = group.x
    if set(x.users) != set(group.linears) or x.op != "call_function" or x.target is not aten.mul.Tensor:
        return None
    K = x.meta["val"].shape[-1]
    for a in x.args:
        if isinstance(a, Node) and a.op == "get_attr" and _single_use_constant(gm, a):
            w = get_constant(gm, a.target)
            if w.dim() == 1 and w.shape[0] == K:
                return Site("norm", a.target)
    for a in x.args:
        if isinstance(a, Node) and is_constant_linear(a) and len(a.users) == 1 and _single_use_constant(gm, a.args[1]):
            b = _bias(a)
            return Site("linear", a.args[1].target, b.target if b is not None else None)
    return None


def fold_scales(gm: GraphModule, group: LinearGroup, site: Site, s: Tensor) -> None:
    """``W_i <- W_i·diag(s)`` for the group, ``1/s`` into the site: the float program is unchanged.
    Computed in at least float32 (float64 weights stay exact to float64 rounding)."""
    def update(name: str, fn) -> None:
        w = get_constant(gm, name)
        dt = torch.promote_types(w.dtype, torch.float32)
        set_constant(gm, name, fn(w.to(dt), s.to(dt)).to(w.dtype))

    for name in group.weight_names():
        update(name, lambda w, s: w * s)
    # a norm's weight [K], or a linear's rows [K, K_in]
    update(site.weight, lambda w, s: w / (s if site.kind == "norm" else s.unsqueeze(1)))
    if site.bias is not None:
        update(site.bias, lambda b, s: b / s)


# --- the sequential runner ---------------------------------------------------------------

GroupHook = Callable[[LinearGroup, list[Tensor]], Optional[list[Tensor]]]


def propagate(gm: GraphModule, samples: list[Tensor], groups: list[LinearGroup], on_group: GroupHook,
              desc: str = "calibrate", progress: bool = False) -> None:
    """Runs ``samples`` (token ids ``[T]``) through ``gm`` (inputs ``input_ids, positions``),
    calling ``on_group(group, inputs)`` when the first linear of each group is reached. The hook
    returns the inputs the group's linears should see (or None: unchanged). Stops after the
    last group: nothing past it is computed."""
    todo = {g.linears[0]: g for g in groups}
    if not todo:
        return
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last_use = {}
    for n in gm.graph.nodes:
        for a in n.all_input_nodes:
            last_use[a] = max(last_use.get(a, -1), order[n])
    frees: dict[int, list[Node]] = {}
    for a, i in last_use.items():
        frees.setdefault(i, []).append(a)
    envs: list[dict[Node, object]] = [{} for _ in samples]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 2, f"calibration runs the flat program (input_ids, positions), got {len(placeholders)} inputs"
    for env, ids in zip(envs, samples):
        env[placeholders[0]], env[placeholders[1]] = ids, torch.arange(ids.numel())
    bar = tqdm(total=len(todo), desc=desc, unit="group", disable=None if progress else True)

    def load(env, a):
        if isinstance(a, Node):
            return get_constant(gm, a.target) if a.op == "get_attr" else env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(load(env, b) for b in a)
        return a

    with torch.no_grad():
        for i, node in enumerate(gm.graph.nodes):
            if node.op == "call_function":
                group = todo.pop(node, None)
                if group is not None:
                    new = on_group(group, [env[group.x] for env in envs])
                    if new is not None:
                        for env, x in zip(envs, new):
                            env[group.x] = x
                    bar.update()
                    if not todo:
                        break
                for env in envs:
                    env[node] = node.target(*load(env, node.args), **{k: load(env, v) for k, v in node.kwargs.items()})
            elif node.op == "output":
                break
            for a in frees.get(i, ()):
                for env in envs:
                    env.pop(a, None)
    bar.close()


def input_rows(inputs: list[Tensor]) -> Tensor:
    """Every calibration token's input row, ``[tokens, K]`` in fp32."""
    return torch.cat([x.reshape(-1, x.shape[-1]).float() for x in inputs])
