"""Small helpers over exported FX graphs: provenance, shapes, op classes.

Every node of a `torch.export` graph carries `meta["nn_module_stack"]` (the
module path that produced it) and `meta["val"]` (a FakeTensor with symbolic
batch and sequence sizes). Site discovery and the passes read only these and
the dataflow.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.fx as fx

from fxlens.errors import StaleHandleError

aten = torch.ops.aten

# Ops that move or view data without computing on it; walks through them keep
# the identity of a value ("the same q, in another layout").
LAYOUT_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.transpose.int, aten.permute.default, aten.expand.default, aten.t.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.slice.Tensor, aten.select.int, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.unbind.int, aten.contiguous.default, aten.clone.default,
    aten.alias.default, aten.detach.default, aten.flatten.using_ints, aten.unflatten.int,
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
    aten.dropout.default, aten.repeat_interleave.self_int, aten.repeat.default,
    operator.getitem,
}

# Linear-like ops: (op, index of the data input, index of the weight).
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
    if node.op != "call_function":
        return False
    if node.target is aten.index.Tensor:
        # x[..., const_idx, :] (Falcon picks its shared k/v heads so): a gather of
        # whole slices by constant indices, i.e. layout
        idx = [i for i in node.args[1] if i is not None]
        return all(isinstance(i, fx.Node) and not _depends_on_input(i) for i in idx)
    return node.target in LAYOUT_OPS


def _depends_on_input(node: fx.Node) -> bool:
    return any(n.op == "placeholder" for n in ancestors(node)) or node.op == "placeholder"


def is_scalar_scale(node: fx.Node) -> bool:
    """`x * c` or `x / c` with a Python number or 0-d constant c (attention scaling)."""
    if node.op != "call_function" or node.target not in (
            aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar):
        return False
    tensors = [a for a in node.args if isinstance(a, fx.Node) and val(a) is not None and val(a).dim() > 0]
    return len(tensors) == 1


def is_param(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


class LinearParts(NamedTuple):
    """A linear found in the graph, whatever op spells it.

    x: data input; w, b: get_attr nodes (b may be None); w_user / b_user: the
    ops that read them; out_in: True if w is stored [out, in] (aten.linear,
    x @ W.T), False if [in, out] (GPT-2 Conv1D addmm, x @ W)."""
    x: fx.Node
    w: fx.Node
    b: fx.Node | None
    w_user: fx.Node
    b_user: fx.Node | None
    out_in: bool


_TRANSPOSES = {aten.t.default, aten.numpy_T.default}


def _weight_of(arg) -> tuple[fx.Node, bool] | None:
    """(get_attr, stored [out, in]?) for a matmul's right operand: W or W.T."""
    if is_param(arg):
        return arg, False
    if isinstance(arg, fx.Node) and arg.op == "call_function" and is_param(arg.args[0]) and (
            arg.target in _TRANSPOSES or (arg.target is aten.permute.default and list(arg.args[1]) == [1, 0])
            or (arg.target is aten.transpose.int and sorted(arg.args[1:3]) in ([0, 1], [-2, -1]))):
        return arg.args[0], True
    return None


def _bias_add(node: fx.Node) -> fx.Node | None:
    """The `add(node, b)` with a 1-D parameter b that completes a bias-free linear,
    made by the linear's module or one enclosing it: a bias another module adds
    (ZAYA's residual scaling, (o_proj(x) + b) * s + ..., after the attention) is
    that module's, not the linear's."""
    users = list(node.users)
    here, there = module_path(node), module_path(users[0]) if len(users) == 1 else ""
    if here and there and here != there and not here.startswith(there + "."):
        return None
    if len(users) == 1 and users[0].target is aten.add.Tensor:
        other = [a for a in users[0].args if a is not node]
        if len(other) == 1 and is_param(other[0]) and val(other[0]) is not None and val(other[0]).dim() == 1:
            return users[0]
    return None


def _bare_linear(node: fx.Node) -> LinearParts | None:
    if node.op != "call_function":
        return None
    t = node.target
    if t is aten.linear.default and len(node.args) >= 2 and is_param(node.args[1]):
        b = node.args[2] if len(node.args) > 2 and is_param(node.args[2]) else None
        return LinearParts(node.args[0], node.args[1], b, node, node if b is not None else None, True)
    if t is aten.addmm.default and is_param(node.args[2]):  # GPT-2 Conv1D: b + x @ W, W [in, out]
        b = node.args[0] if is_param(node.args[0]) else None
        return LinearParts(node.args[1], node.args[2], b, node, node if b is not None else None, False)
    if t in (aten.matmul.default, aten.mm.default):        # Falcon: x @ W.T
        found = _weight_of(node.args[1])
        if found is not None:
            w, out_in = found
            return LinearParts(node.args[0], w, None, node if w is node.args[1] else node.args[1], None, out_in)
    if t is aten.sum.dim_IntList and list(node.args[1]) == [2]:
        # the output projection per head (materialise_opt_in's attn.hook_result):
        # sum_h einsum('bshd,hdm->bshm', z, reshape(W or W.T, [h, d, m])) = z_flat @ W_O,
        # with the site's HookPoint (a call_module) between the einsum and the sum
        per_head = node.args[0]
        while isinstance(per_head, fx.Node) and per_head.op == "call_module":
            per_head = per_head.args[0]
        if not (isinstance(per_head, fx.Node) and per_head.target is aten.einsum.default
                and per_head.args[0] == PER_HEAD_EINSUM):
            return None
        z, w_h = per_head.args[1]
        found = _weight_of(w_h.args[0]) if w_h.target is aten.reshape.default else None
        if found is not None:
            w, out_in = found
            return LinearParts(z, w, None, w_h if w is w_h.args[0] else w_h.args[0], None, out_in)
    return None


PER_HEAD_EINSUM = "bshd,hdm->bshm"


def linear_parts(node: fx.Node) -> LinearParts | None:
    """The parts of a linear whose result is `node`, or None.

    A bias-free linear followed by `add(., b)` is one linear whose result is the
    add; the bare op alone is then not reported, so each linear is found once."""
    if node.op != "call_function":
        return None
    if node.target is aten.add.Tensor:
        inner = next((a for a in node.args if isinstance(a, fx.Node) and _bias_add(a) is node), None)
        parts = _bare_linear(inner) if inner is not None else None
        if parts is not None and parts.b is None:
            b = next(a for a in node.args if a is not inner)
            return parts._replace(b=b, b_user=node)
        return None
    parts = _bare_linear(node)
    if parts is not None and parts.b is None and _bias_add(node) is not None:
        return None
    return parts


def linear_of(node: fx.Node) -> fx.Node | None:
    """The node that stands for the linear `node` belongs to (itself, or its bias add)."""
    if linear_parts(node) is not None:
        return node
    add = _bias_add(node) if node.op == "call_function" else None
    return add if add is not None and linear_parts(add) is not None else None


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


def position_bias(mm: fx.Node) -> fx.Node | None:
    """The bias a `baddbmm` adds to QK^T when it is made from positions alone (no
    embedding upstream): ALiBi (BLOOM). None for any other matmul or bias."""
    if mm.target is not aten.baddbmm.default:
        return None
    bias = mm.args[0]
    if not isinstance(bias, fx.Node) or any(a.target is aten.embedding.default for a in ancestors(bias)):
        return None
    return bias


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


# --- spec handles -----------------------------------------------------------------
# The spec (fxlens.discovery.decoder.ModelSpec) names the nodes passes need by
# handle ("blocks.3.attn.o_proj"), recorded here on the node; passes look them up
# in the graph they run on, so a graph copy (its meta is copied) answers too and a
# node a pass replaced is an error, not a stale object. Values are frozensets:
# graph copies share meta values, so a handle set is replaced, never mutated.
HANDLES = "fxlens.handles"


def handles_of(node: fx.Node) -> frozenset:
    return node.meta.get(HANDLES, frozenset())


def add_handle(node: fx.Node, handle: str) -> None:
    node.meta[HANDLES] = handles_of(node) | {handle}


def move_handles(old: fx.Node, new: fx.Node) -> None:
    """`new` now stands for `old` (a pass replaced it): its handles go with it."""
    if handles_of(old):
        new.meta[HANDLES] = handles_of(new) | handles_of(old)
        del old.meta[HANDLES]


def _graph_of(gm) -> fx.Graph:
    return gm.graph if isinstance(gm, fx.GraphModule) else gm


def site_nodes(gm, handle: str) -> list[fx.Node]:
    """Every node of `gm` (a GraphModule or Graph) carrying `handle` (a group handle),
    in graph order; StaleHandleError when none does."""
    found = [n for n in _graph_of(gm).nodes if handle in n.meta.get(HANDLES, ())]
    if not found:
        raise StaleHandleError(handle, "no node")
    return found


def site_node(gm, handle: str) -> fx.Node:
    """The one node of `gm` (a GraphModule or Graph) the spec handle names."""
    found = site_nodes(gm, handle)
    if len(found) != 1:
        raise StaleHandleError(handle, f"{len(found)} nodes ({', '.join(n.name for n in found[:4])})")
    return found[0]
