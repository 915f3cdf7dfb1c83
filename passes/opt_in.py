"""materialise_opt_in: add an opt-in TransformerLens site to a hooked graph.

TransformerLens only has these when a config flag is set; fxlens rewrites the
graph the first time a user names one.

attn.hook_result  [b, s, h, m]
  Matches  the attention's output projection o = z_flat @ W_O + b_O.
  Rewrites o -> result = einsum('bshd,hdm->bshm', z, W_O per head); hook;
           o' = result.sum(heads) + b_O
hook_mlp_in       [b, s, m]
  Matches  the residual value entering the MLP's norm (or its projections).
  Rewrites only those edges go through the hook, as TransformerLens's
           `hook_mlp_in(resid_mid.clone())` does.
Requires discover_sites and insert_hooks (reads the block spec).
Invariant: the new site has exactly one HookPoint (checked by insert_hooks).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxlens.analysis import residual_layout
from fxlens.errors import FxlensError
from fxlens.graph import is_layout, linear_parts, module_paths, shape, walk_back
from fxlens.hook_points import Layout
from fxlens.names import split_name
from fxlens.passes_base import PassResult

from .insert_hooks import insert_hooks

aten = torch.ops.aten
NAME = "materialise_opt_in"


class OptInError(FxlensError):
    pass


def _annotate(node: fx.Node, name: str, layout=Layout(), edge_users=None) -> None:
    node.meta.setdefault("fxlens.sites", []).append((name, layout, edge_users))


def _per_head_w_o(graph: fx.Graph, o_proj: fx.Node, heads: int, d_head: int) -> fx.Node:
    """W_O as [head, d_head, d_model] from the projection's stored weight."""
    parts = linear_parts(o_proj)
    w = parts.w
    wt = graph.call_function(aten.t.default, (w,)) if parts.out_in else w
    return graph.call_function(aten.reshape.default, (wt, [heads, d_head, -1]))


def _result(gm: fx.GraphModule, spec, layer: int, name: str) -> fx.Node:
    b = spec.blocks[layer]
    graph = gm.graph
    o = b.o_proj
    x, bias = linear_parts(o).x, linear_parts(o).b
    # the [batch, pos, head*d_head] value feeding the projection (before addmm's 2-D view)
    z_flat = next((n for n in walk_back(x, is_layout) if shape(n) and len(shape(n)) == 3), None)
    out = o
    # the projection's [batch, pos, d_model] output: o itself, or the view after addmm
    if len(shape(o)) != 3:
        out = next(u for u in o.users if is_layout(u) and shape(u) and len(shape(u)) == 3)
    if z_flat is None:
        raise OptInError(f"{NAME}: {name}: no [batch, pos, head*d_head] input to {o.name}")
    with graph.inserting_before(o):
        z = graph.call_function(aten.unflatten.int, (z_flat, -1, [b.n_heads, b.d_head]))
        w_o = _per_head_w_o(graph, o, b.n_heads, b.d_head)
        # result[b, s, h, m] = sum_d z[b, s, h, d] W_O[h, d, m]
        result = graph.call_function(aten.einsum.default, ("bshd,hdm->bshm", [z, w_o]))
        summed = graph.call_function(aten.sum.dim_IntList, (result, [2]))
        new_out = summed
        if bias is not None:
            new_out = graph.call_function(aten.add.Tensor, (summed, bias))
    for n in (z, w_o, result, summed, new_out):
        n.meta["nn_module_stack"] = dict(o.meta.get("nn_module_stack", {}))
        n.meta["fxlens.created_by"] = NAME
    out.replace_all_uses_with(new_out)
    graph.eliminate_dead_code()
    return result


def materialise_opt_in(gm: fx.GraphModule, spec, name: str) -> PassResult:
    layer, short = split_name(name)
    if layer is None or not 0 <= layer < len(spec.blocks):
        raise OptInError(f"{NAME}: {name} names no block of this model (0..{len(spec.blocks) - 1})")
    b = spec.blocks[layer]
    if short == "attn.hook_result":
        node = _result(gm, spec, layer, name)
        _annotate(node, name)
    elif short == "hook_mlp_in":
        if b.ln2 is not None:
            norm_nodes = [n for n in gm.graph.nodes if b.ln2 in module_paths(n)]
            inner = set(norm_nodes)
            feed = [a for n in norm_nodes for a in n.all_input_nodes
                    if a not in inner and a.op != "get_attr" and shape(a) and len(shape(a)) >= 2]
            src = feed[0]
            users = [u for u in src.users if u in inner]
        else:
            src = b.mlp_in_node
            users = [u for u in src.users if u in b.mlp_nodes]
        _annotate(src, name, residual_layout(gm.graph, src), users)
    else:
        raise OptInError(
            f"{NAME}: {name} is not available yet: fxlens materialises attn.hook_result and "
            f"hook_mlp_in on demand; per-head q/k/v inputs and hook_attn_in are not implemented")
    result = insert_hooks(gm, only={name})
    gm.recompile()
    return PassResult(NAME, matched=result.matched, details={"site": name})
