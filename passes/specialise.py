"""specialise: shape a copy of the hooked graph to one set of observed sites.

Matches  the HookPoint nodes (`call_module` nodes with `meta["fxlens.site"]`).
Rewrites (on a copy: `fxlens.compiled` copies the model's graph first, and the
model's own graph is never touched)
  unobserved site   x -> hook(name) -> users  becomes  x -> users
                    (the site costs nothing: no call, no copy)
  cached site       x -> hook(name) -> users  becomes  x -> users,
                    to_tl(x) -> an extra graph output
  hooked site       x -> hook(name) -> users  kept: the HookPoint runs the
                    user's hooks (torch.compile traces them into the graph)
  hooked + cached   the extra output is to_tl(hook output): the cache sees the
                    edited value, as when cache hooks run after user hooks
  output            logits  becomes  (logits, *cached in the order asked)
  unobserved per-head products (attn.hook_result's einsum, once its hook is
  gone):  sum(einsum('bshd,hdm->bshm', z, W_O), [2])  becomes
          einsum('bshd,hdm->bsm', z, W_O)
          (the sum over heads joins the contraction: no [b, s, h, m] tensor)
          (matched by torch.fx's SubgraphMatcher on a pattern traced from `_summed_einsum`)
  layout modules    call_module(FromTL, y)  becomes  from_tl(y) as ATen nodes
`to_tl` is the site's `Layout.to_tl` traced into ATen ops (`emit_layout`:
[b, h, s, d] -> transpose, [b, s, h*d] -> view, additive mask -> -inf, grouped
heads -> select, ...), the very function the eager HookPoint runs, so the
cached tensor comes out of the compiled graph in TransformerLens's layout.
Requires insert_hooks (and materialise_opt_in for any opt-in site named).
Invariant: the HookPoint nodes left are exactly the hooked sites, and the
output holds 1 + len(cached) values (with `keep_outputs`, the graph's own
outputs + len(cached)).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence

import torch
import torch.fx as fx
from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

from fxlens.errors import PassError
from fxlens.ir.hook_points import HookPoint, Layout, emit_layout
from fxlens.ir.pass_result import PassResult

aten = torch.ops.aten
NAME = "specialise"


def hook_nodes(graph: fx.Graph) -> dict[str, fx.Node]:
    """Site name -> its HookPoint node."""
    return {n.meta["fxlens.site"]: n for n in graph.nodes
            if n.op == "call_module" and "fxlens.site" in n.meta}


def to_tl_nodes(graph: fx.Graph, x: fx.Node, layout: Layout, batch: fx.Node | None,
                name: str) -> fx.Node:
    """`layout.to_tl(x, batch)` as graph nodes at the insertion point, traced from
    `Layout.to_tl` itself (`emit_layout`), tagged as the cache of `name`."""
    before = set(graph.nodes)
    out = emit_layout(graph, layout, "to_tl", x, batch)
    _tag(graph, before, x, {"fxlens.cache_of": name})
    return out


def _tag(graph: fx.Graph, before: set, like: fx.Node, extra: dict) -> None:
    for n in graph.nodes:
        if n not in before:
            n.meta["nn_module_stack"] = dict(like.meta.get("nn_module_stack", {}))
            n.meta["fxlens.created_by"] = NAME
            n.meta.update(extra)


def inline_layout_modules(gm: fx.GraphModule) -> int:
    """call_module(m, y) where m is a layout-mapping module (`layout` and no
    hooks, e.g. the opt-in pass's FromTL) -> `m.layout.from_tl(y, y)` as nodes,
    so that a variant's graph holds no module calls besides the HookPoints."""
    graph = gm.graph
    n_done = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or "fxlens.site" in node.meta:
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, HookPoint) or not isinstance(getattr(mod, "layout", None), Layout):
            continue
        (y,) = node.args
        before = set(graph.nodes)
        with graph.inserting_before(node):
            out = emit_layout(graph, mod.layout, "from_tl", y, out_val=node.meta.get("val"))
        _tag(graph, before, node, {})
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        n_done += 1
    return n_done


def specialise(gm: fx.GraphModule, cached: Sequence[str], hooked: Collection[str],
               keep_outputs: bool = False) -> PassResult:
    """`keep_outputs`: every output the graph returns stays, the cached values after
    them (generation's prefill and decode graphs return each layer's keys and
    values after the logits); otherwise the logits alone come before them."""
    graph = gm.graph
    hooks = hook_nodes(graph)
    missing = [n for n in (*cached, *hooked) if n not in hooks]
    if missing:
        raise PassError(NAME, f"no hook node for {missing}; materialise opt-in sites first")
    hooked = set(hooked)
    outputs: list[fx.Node] = []
    removed = 0
    for name in cached:
        node = hooks[name]
        layout = node.graph.owning_module.get_submodule(node.target).layout
        batch = node.args[1] if len(node.args) > 1 else None
        src = node if name in hooked else node.args[0]
        with graph.inserting_before(src.next):   # in order, right after the value
            outputs.append(to_tl_nodes(graph, src, layout, batch, name))
    out = graph.output_node()
    returned = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    kept = tuple(returned) if keep_outputs else returned[:1]
    out.args = ((*kept, *outputs),)
    for name, node in hooks.items():
        if name in hooked:
            continue
        # unobserved (or only cached): the hook's input flows on directly
        # (the output and the to_tl nodes are users too, so they follow)
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        removed += 1
    inlined = inline_layout_modules(gm)
    contracted = _contract_summed_einsums(graph)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    # invariant: only the hooked sites keep a HookPoint; one output per cached name
    left = set(hook_nodes(graph))
    if left != hooked:
        raise PassError(NAME, f"HookPoints left {sorted(left ^ hooked)} differ from the hooked sites")
    if len(graph.output_node().args[0]) != len(kept) + len(cached):
        raise PassError(NAME, "the output does not hold one value per cached site")
    return PassResult(NAME, matched=len(hooks),
                      details={"cached": len(cached), "hooked": len(hooked), "removed": removed,
                               "contracted": contracted, "inlined": inlined})


def _summed_einsum(eq, operands, dims):
    """The reference the contraction's pattern is traced from: a per-head product summed over heads."""
    return aten.sum.dim_IntList(aten.einsum.default(eq, operands), dims)


@functools.cache
def _summed_einsum_pattern() -> fx.Graph:
    return fx.symbolic_trace(_summed_einsum).graph


def _contract_summed_einsums(graph: fx.Graph) -> int:
    """sum(einsum('..->bshm'), [2]) -> einsum('..->bsm') where nothing else reads the
    einsum (SubgraphMatcher keeps only matches whose einsum has no other user)."""
    n_done = 0
    for match in SubgraphMatcher(_summed_einsum_pattern()).match(graph):
        args = {pn.target: gn for pn, gn in match.nodes_map.items() if pn.op == "placeholder"}
        eq, operands, dims = args["eq"], args["operands"], args["dims"]
        (node,) = match.returning_nodes
        src = node.args[0]
        if not (isinstance(eq, str) and isinstance(dims, (list, tuple)) and len(dims) == 1):
            continue
        ins, arrow, out = eq.replace(" ", "").partition("->")
        if not arrow or "." in eq:
            continue
        dim = dims[0] % len(out)
        with graph.inserting_before(node):
            new = graph.call_function(aten.einsum.default, (f"{ins}->{out[:dim]}{out[dim + 1:]}", operands))
        new.meta.update({k: node.meta[k] for k in ("val", "nn_module_stack") if k in node.meta})
        new.meta["fxlens.created_by"] = NAME
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(src)
        n_done += 1
    return n_done
