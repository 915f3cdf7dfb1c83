"""Small helpers over exported FX graphs: provenance, shapes, op classes.

Every node of a `torch.export` graph carries `meta["nn_module_stack"]` (the
module path that produced it) and `meta["val"]` (a FakeTensor with symbolic
batch and sequence sizes). Site discovery and the passes read only these and
the dataflow.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.fx as fx

aten = torch.ops.aten

# Ops that move or view data without computing on it; walks through them keep
# the identity of a value ("the same q, in another layout").
LAYOUT_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.transpose.int, aten.permute.default, aten.expand.default, aten.t.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.unbind.int, aten.contiguous.default, aten.clone.default,
    aten.alias.default, aten.detach.default, aten.flatten.using_ints, aten.unflatten.int,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
    aten.dropout.default, aten.repeat_interleave.self_int, aten.repeat.default,
    operator.getitem,
}

# Linear-like ops: (op, index of the data input, index of the weight).
LINEAR_OPS = {
    aten.linear.default: (0, 1),
    aten.addmm.default: (1, 2),   # GPT-2 Conv1D: bias + x @ W, W stored [in, out]
    aten.matmul.default: (0, 1),  # Falcon's FalconLinear: x @ W.T
    aten.mm.default: (0, 1),
}

SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default}


def module_path(node: fx.Node) -> str:
    """Path of the innermost module that produced `node` ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in stack.values()]


def module_class(node: fx.Node, path: str) -> type | None:
    for p, cls in (node.meta.get("nn_module_stack") or {}).values():
        if p == path:
            return cls if isinstance(cls, type) else None
    return None


def within(node: fx.Node, path: str) -> bool:
    """True if `node` was produced inside module `path` (or one of its children)."""
    return path in module_paths(node)


def val(node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None


def shape(node) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if v is not None else None


def same_size(a, b) -> bool:
    """Compare two (possibly symbolic) sizes without adding guards."""
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        ea = a.node.expr if isinstance(a, torch.SymInt) else a
        eb = b.node.expr if isinstance(b, torch.SymInt) else b
        return bool(ea == eb)
    return a == b


def is_layout(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LAYOUT_OPS


def is_scalar_scale(node: fx.Node) -> bool:
    """`x * c` or `x / c` with a Python number or 0-d constant c (attention scaling)."""
    if node.op != "call_function" or node.target not in (
            aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar):
        return False
    tensors = [a for a in node.args if isinstance(a, fx.Node) and val(a) is not None and val(a).dim() > 0]
    return len(tensors) == 1


def is_param(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def linear_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """(data input, weight, bias) if `node` is a linear with a parameter weight."""
    if node.op != "call_function" or node.target not in LINEAR_OPS:
        return None
    i, w = LINEAR_OPS[node.target]
    if len(node.args) <= w or not is_param(node.args[w]):
        return None
    if node.target is aten.addmm.default:
        bias = node.args[0] if is_param(node.args[0]) else None
    elif node.target is aten.linear.default:
        bias = node.args[2] if len(node.args) > 2 and is_param(node.args[2]) else None
    else:
        bias = None
    return node.args[i], node.args[w], bias


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    out = []
    for a in node.all_input_nodes:
        if a.op != "get_attr" and val(a) is not None:
            out.append(a)
    return out


def ancestors(node: fx.Node, keep=lambda n: True) -> set[fx.Node]:
    """All nodes `node` depends on, walking only through nodes where keep(n)."""
    seen: set[fx.Node] = set()
    todo = list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n in seen or not keep(n):
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def layout_closure(start: fx.Node) -> list[fx.Node]:
    """`start` and every node reachable from it through layout ops only."""
    out, todo, seen = [], [start], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        out.append(n)
        todo.extend(u for u in n.users if is_layout(u))
    return out


def walk_back(node: fx.Node, through) -> list[fx.Node]:
    """Follow first tensor inputs back while `through(n)`; returns the chain, last = stop node."""
    chain = [node]
    while through(chain[-1]):
        ins = tensor_inputs(chain[-1])
        if not ins:
            break
        chain.append(ins[0])
    return chain


def output_node(nodes: Iterable[fx.Node]) -> fx.Node | None:
    """The last node of a group whose value is used outside the group."""
    group = set(nodes)
    outs = [n for n in group if val(n) is not None and any(u not in group for u in n.users)]
    if not outs:
        return None
    order = {n: i for i, n in enumerate(next(iter(group)).graph.nodes)}
    return max(outs, key=order.__getitem__)


def fake_mode_of(graph: fx.Graph):
    for n in graph.nodes:
        v = val(n)
        if v is not None and hasattr(v, "fake_mode"):
            return v.fake_mode
    return None


def new_node(graph: fx.Graph, target, args, kwargs=None, like: fx.Node | None = None,
             origin: str | None = None) -> fx.Node:
    """Create a call_function node with `meta["val"]` computed on fake tensors and
    the provenance of `like`, so later passes and dumps see it as any other node."""
    kwargs = kwargs or {}
    node = graph.call_function(target, tuple(args), kwargs)
    if like is not None and "nn_module_stack" in like.meta:
        node.meta["nn_module_stack"] = dict(like.meta["nn_module_stack"])
    mode = fake_mode_of(graph)
    if mode is not None:
        def fake(a):
            return a.meta.get("val") if isinstance(a, fx.Node) else a
        fargs = torch.utils._pytree.tree_map(fake, tuple(args))
        fkwargs = torch.utils._pytree.tree_map(fake, kwargs)
        try:
            with mode:
                node.meta["val"] = target(*fargs, **fkwargs)
        except Exception:  # shape propagation is best-effort metadata only
            pass
    if origin:
        node.meta["fxlens.created_by"] = origin
    return node


def topo_index(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}
