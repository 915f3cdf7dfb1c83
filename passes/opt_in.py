"""materialise_opt_in: add an opt-in TransformerLens site to a hooked graph.

TransformerLens only has these when a config flag is set; fxlens rewrites the
graph the first time a user names one.

attn.hook_result  [b, s, h, m]
  Matches  the attention's output projection o = z_flat @ W_O + b_O.
  Rewrites o -> result = einsum('bshd,hdm->bshm', z, W_O per head); hook;
           o' = result.sum(heads) + b_O
hook_q_input / hook_k_input / hook_v_input   [b, s, h (kv heads for k, v), m]
hook_attn_in      [b, s, h, m]  (one input for q, k and v; not with grouped kv heads)
  Matches  resid_pre, the attention's norm (ln1) and the q/k/v projections,
           whose per-head output columns come from index tracing.
  Rewrites resid_pre -> x_h = resid_pre repeated per head; hook; ln1 on each
           head's copy; y = x_h_ln @ W^T + b; each head keeps its own columns
           -> replaces what the hook_q (k, v) site node held. Unedited, every head
           sees the same input and the numbers are the model's.
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

from fxlens.discovery.decoder import residual_layout
from fxlens.errors import FxlensError
from fxlens.ir.graph import (PER_HEAD_EINSUM, is_layout, linear_parts, module_paths, move_handles, output_node,
                             shape, site_node, site_nodes, walk_back)
from fxlens.ir.hook_points import Layout
from fxlens.discovery.names import split_name
from fxlens.ir.pass_result import PassResult

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
    o = site_node(gm, b.o_proj)
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
        result = graph.call_function(aten.einsum.default, (PER_HEAD_EINSUM, [z, w_o]))
        summed = graph.call_function(aten.sum.dim_IntList, (result, [2]))
        new_out = summed
        if bias is not None:
            new_out = graph.call_function(aten.add.Tensor, (summed, bias))
    for n in (z, w_o, result, summed, new_out):
        n.meta["nn_module_stack"] = dict(o.meta.get("nn_module_stack", {}))
        n.meta["fxlens.created_by"] = NAME
    out.replace_all_uses_with(new_out)
    # new_out is the output projection now (a per-head linear: fxlens.ir.graph.linear_parts)
    move_handles(o, new_out)
    graph.eliminate_dead_code()
    return result


class FromTL(torch.nn.Module):
    """Maps a TransformerLens-layout value back to a site node's own layout."""

    def __init__(self, layout: Layout):
        super().__init__()
        self.layout = layout

    def forward(self, x):
        return self.layout.from_tl(x, x)


def _site_node(graph: fx.Graph, name: str) -> tuple[fx.Node, fx.Node, Layout]:
    """(hook node, the node it reads, layout) of a materialised site."""
    hook = next(n for n in graph.nodes if n.meta.get("fxlens.site") == name)
    src = hook.args[0]
    while not any(nm == name for nm, _, _ in src.meta.get("fxlens.sites", [])):
        src = src.args[0]   # chained hooks on one node (resid_post L-1, then resid_pre L)
    layout = next(lay for nm, lay, _ in src.meta["fxlens.sites"] if nm == name)
    return hook, src, layout


def _copy_norm(graph: fx.Graph, norm: str, x: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Apply the norm module `norm` to `x` by copying its nodes (its ops reduce over
    the last dim, so a head axis passes through). Returns the copy's output and its
    calls of the norm's own hook points (`ln1.hook_scale` / `hook_normalized` on the
    head axis, [batch, pos, head, 1] / [..., d_model]); `_one_call_per_hook` keeps
    them only where the original norm no longer runs."""
    # the norm's own nodes, not copies made for another role
    nodes = [n for n in graph.nodes if norm in module_paths(n) and n.meta.get("fxlens.created_by") != NAME]
    inner = set(nodes)
    env = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inner and a.op != "get_attr" and a not in env and shape(a) and len(shape(a)) >= 2:
                env[a] = x
    last, hooks = None, []
    for n in nodes:
        if n.op == "call_module":
            env[n] = graph.call_module(n.target, (env[n.args[0]],) + tuple(n.args[1:]))
            env[n].meta["nn_module_stack"] = dict(n.meta.get("nn_module_stack", {}))
            env[n].meta["fxlens.site_copy"] = n.meta.get("fxlens.site")
            hooks.append(env[n])
        else:
            env[n] = graph.node_copy(n, lambda a: env.get(a, a))
            env[n].meta.pop("fxlens.sites", None)
            env[n].meta.pop("fxlens.norm_part", None)
        env[n].meta["fxlens.created_by"] = NAME
        last = n
    out = output_node(nodes) or last
    return env[out], hooks


def _one_call_per_hook(graph: fx.Graph, copied: list[fx.Node]) -> None:
    """A site fires once per call with one shape. The norm copies of split inputs call
    the norm's hook points; where the original norm still runs (it feeds the other
    projections, or a parallel MLP), its hooks stay there ([batch, pos, 1]) and the
    copies' calls go. Where it no longer runs (hook_attn_in: one shared copy; or the
    last of q/k/v split), the copy made now keeps them, with the head axis, as
    TransformerLens's split-input mode shows them."""
    mine = set(copied)
    elsewhere = {n.target for n in graph.nodes if n.op == "call_module" and n not in mine}
    for n in copied:
        if n.target in elsewhere:
            n.replace_all_uses_with(n.args[0])
            graph.erase_node(n)
        else:                               # the site's one hook node now
            n.meta["fxlens.site"] = n.meta["fxlens.site_copy"]


def _buffer(gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
    gm.register_buffer(name, value, persistent=False)
    return gm.graph.get_attr(name)


def _split_inputs(gm: fx.GraphModule, spec, maps, layer: int, short: str) -> None:
    b = spec.blocks[layer]
    graph = gm.graph
    names = {r: f"blocks.{layer}.hook_{r}_input" for r in "qkv"}
    split = any(n.meta.get("fxlens.site") in names.values() for n in graph.nodes)
    shared = any(n.meta.get("fxlens.site") == f"blocks.{layer}.hook_attn_in" for n in graph.nodes)
    if (short == "hook_attn_in" and split) or (short != "hook_attn_in" and shared):
        raise OptInError(f"{NAME}: blocks.{layer}: hook_attn_in and hook_q/k/v_input exclude each "
                         f"other (as in TransformerLens); use one kind per model")
    if short == "hook_attn_in" and b.n_kv_heads != b.n_heads:
        raise OptInError(f"{NAME}: blocks.{layer}.hook_attn_in: k and v have {b.n_kv_heads} kv heads "
                         f"for {b.n_heads} query heads; use hook_k_input / hook_v_input instead")
    roles = "qkv" if short == "hook_attn_in" else short[len("hook_")]
    order = {n: i for i, n in enumerate(graph.nodes)}
    # the shared input of hook_attn_in must come before the first of the three sites
    roles = sorted(roles, key=lambda r: order[_site_node(graph, f"blocks.{layer}.attn.hook_{r}")[1]])
    resid, _, _ = _site_node(graph, f"blocks.{layer}.hook_resid_pre")
    x_ln, copied = None, []
    for role in roles:
        lin, cols = maps.get(role, f"blocks.{layer}.{short}")   # cols [head, d_head] of the projection's output
        hook, site, layout = _site_node(graph, f"blocks.{layer}.attn.hook_{role}")
        heads = cols.shape[0]
        with graph.inserting_before(site):
            if x_ln is None or short != "hook_attn_in":     # hook_attn_in: one input (and norm) for q, k, v
                # [b, s, m] -> [b, s, head, m]: each head reads its own copy
                x = graph.call_function(aten.expand.default,
                                        (graph.call_function(aten.unsqueeze.default, (resid, 2)), [-1, -1, heads, -1]))
                x.meta["val"] = resid.meta["val"].unsqueeze(2).expand(-1, -1, heads, -1)
                site_name = f"blocks.{layer}.{short}"
                _annotate(x, site_name)
                x_ln, hooks = _copy_norm(graph, b.ln1, x) if b.ln1 else (x, [])
                copied += hooks
            parts = lin.parts
            w = parts.w if parts.out_in else graph.call_function(aten.t.default, (parts.w,))
            y = graph.call_function(aten.linear.default, (x_ln, w, parts.b))       # [b, s, head, out]
            tag = f"fxlens_opt_in_{layer}_{role}_{short}"
            head_idx = _buffer(gm, f"{tag}_heads", torch.arange(heads)[:, None])
            col_idx = _buffer(gm, f"{tag}_cols", cols.clone())
            per_head = graph.call_function(aten.index.Tensor, (y, [None, None, head_idx, col_idx]))  # [b, s, head, d_head]
            gm.add_module(tag, FromTL(layout))
            back = graph.call_module(tag, (per_head,))
        for n in (y, per_head, back):
            n.meta["nn_module_stack"] = dict(site.meta.get("nn_module_stack", {}))
            n.meta["fxlens.created_by"] = NAME
        back.meta["val"] = site.meta.get("val")
        hook.replace_input_with(site, back)
    graph.eliminate_dead_code()
    _one_call_per_hook(graph, copied)


def materialise_opt_in(gm: fx.GraphModule, spec, name: str, maps=None) -> PassResult:
    layer, short = split_name(name)
    if layer is None or not 0 <= layer < len(spec.blocks):
        raise OptInError(f"{NAME}: {name} names no block of this model (0..{len(spec.blocks) - 1})")
    b = spec.blocks[layer]
    if short != "hook_mlp_in" and not b.has_attn or short == "hook_mlp_in" and not b.has_mlp:
        what = "attention" if short != "hook_mlp_in" else "MLP"
        raise OptInError(f"{NAME}: {name}: block {layer} has no {what} (its sublayers: "
                         f"{'a token mixer without attention scores, ' if b.mixer else ''}"
                         f"{'an MLP' if b.has_mlp else 'no MLP'})")
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
            src = site_node(gm, b.mlp_in)
            users = site_nodes(gm, b.mlp_in_readers) if b.mlp_in_readers else []
        _annotate(src, name, residual_layout(gm.graph, src), users)
    elif short in ("hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_in"):
        if maps is None:
            raise OptInError(f"{NAME}: {name} needs the model's column maps")
        _split_inputs(gm, spec, maps[layer], layer, short)
    else:
        raise OptInError(f"{NAME}: {name} is not an opt-in site fxlens knows")
    result = insert_hooks(gm, only={name})
    gm.recompile()
    return PassResult(NAME, matched=result.matched, details={"site": name})
