"""Small FX helpers shared by the passes and the load-time lowerings: constants held as
attributes of an (unlifted) exported GraphModule, and new nodes whose ``meta["val"]`` is
computed under the graph's own fake mode, so every rewrite leaves shapes valid."""
from typing import Any, Callable

import torch
from torch._guards import detect_fake_mode
from torch.fx import GraphModule, Node


def fake_mode_of(gm: GraphModule):
    mode = detect_fake_mode([n.meta["val"] for n in gm.graph.nodes if "val" in n.meta])
    assert mode is not None, "graph carries no fake values: was it produced by torch.export?"
    return mode


def get_constant(gm: GraphModule, fqn: str) -> torch.Tensor:
    mod, _, name = fqn.rpartition(".")
    return getattr(gm.get_submodule(mod) if mod else gm, name)


def free_name(gm: GraphModule, fqn: str) -> str:
    """``fqn``, or ``fqn_1``, ``fqn_2``… : the first dotted path not yet taken in ``gm``."""
    def taken(name):
        try:
            get_constant(gm, name)
            return True
        except AttributeError:
            return False
    name, i = fqn, 0
    while taken(name):
        i += 1
        name = f"{fqn}_{i}"
    return name


def set_constant(gm: GraphModule, fqn: str, value: torch.Tensor) -> None:
    """Registers ``value`` as a buffer at dotted path ``fqn`` (creating parent modules)."""
    mod_path, _, name = fqn.rpartition(".")
    mod = gm
    for part in mod_path.split(".") if mod_path else []:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
        assert isinstance(mod, torch.nn.Module), f"{fqn}: {part} is a {type(mod).__name__}, not a module"
    if hasattr(mod, name):
        delattr(mod, name)
    mod.register_buffer(name, value)


def insert_constant(gm: GraphModule, fqn: str, value: torch.Tensor) -> Node:
    """Adds ``value`` as a buffer and returns a ``get_attr`` node for it (insert point: caller's)."""
    set_constant(gm, fqn, value)
    node = gm.graph.get_attr(fqn)
    node.meta["val"] = fake_mode_of(gm).from_tensor(value, static_shapes=True)
    return node


def insert_call(gm: GraphModule, target: Callable, args: tuple, kwargs: dict | None = None) -> Node:
    """``call_function`` node with its ``meta["val"]`` from the target's fake kernel."""
    kwargs = kwargs or {}
    node = gm.graph.call_function(target, args, kwargs)
    fake = lambda a: a.meta["val"] if isinstance(a, Node) else a  # noqa: E731
    with fake_mode_of(gm):
        node.meta["val"] = target(*torch.fx.node.map_aggregate(args, fake),
                                  **torch.fx.node.map_aggregate(kwargs, fake))
    return node


def drop_unused_constants(gm: GraphModule) -> list[str]:
    """Deletes parameters and buffers no ``get_attr`` node reads any more; returns their names."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = []
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used:
            mod, _, attr = name.rpartition(".")
            owner = gm.get_submodule(mod) if mod else gm
            if hasattr(owner, attr):
                delattr(owner, attr)
                dropped.append(name)
    return dropped


def hoist_constants(gm: GraphModule) -> GraphModule:
    """Every ``get_attr`` reads a top-level attribute (``_c0``, ``_c1``, …) instead of walking
    nested modules on each call: a load-time change for speed, outputs unchanged."""
    names: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if node.target not in names:
                names[node.target] = f"_c{len(names)}"
                value = get_constant(gm, node.target)
                if isinstance(value, torch.nn.Parameter):
                    gm.register_parameter(names[node.target], value)
                elif isinstance(value, torch.Tensor):
                    gm.register_buffer(names[node.target], value)
                else:  # a submodule (e.g. a guard function): leave it where it is
                    names[node.target] = node.target
            node.target = names[node.target]
    return finish(gm)


def finish(gm: GraphModule) -> GraphModule:
    """What every pass ends with: dead code out, graph checked, code regenerated."""
    gm.graph.eliminate_dead_code()
    drop_unused_constants(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def call_nodes(gm: GraphModule, target: Any) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]
