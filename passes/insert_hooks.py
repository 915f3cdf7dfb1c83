"""insert_hooks: materialise a HookPoint after every annotated site node.

Matches  nodes with `meta["fxlens.sites"]`: [(name, Layout, edge_users | None)]
         written by site discovery (or by the opt-in pass).
Rewrites x -> users   becomes   x -> hook(name) -> users
         (several sites on one node chain in canonical order, e.g.
         blocks.0.hook_resid_post then blocks.1.hook_resid_pre; a site limited
         to some users, like hook_mlp_in, rewires only those edges).
Requires site discovery.
Invariant: every annotated site has exactly one HookPoint node in the graph, and
         every HookPoint is called from one node (a site fires once per call).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxlens.errors import PassError
from fxlens.ir.hook_points import HookPoint
from fxlens.discovery.names import canonical_order
from fxlens.ir.pass_result import PassResult

NAME = "insert_hooks"
CONTAINER = "fxlens_hooks"


def hook_target(name: str) -> str:
    return f"{CONTAINER}.{name.replace('.', '__')}"


def _batch_node(graph: fx.Graph) -> fx.Node:
    for n in graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.sym_size.int and n.args[1] == 0 \
                and n.args[0].op == "placeholder":
            return n
    ids = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(ids):
        return graph.call_function(torch.ops.aten.sym_size.int, (ids, 0))


def insert_hooks(gm: fx.GraphModule, only: set[str] | None = None) -> PassResult:
    graph = gm.graph
    if not hasattr(gm, CONTAINER):
        gm.add_module(CONTAINER, torch.nn.Module())
    existing = {n.meta["fxlens.site"] for n in graph.nodes if "fxlens.site" in n.meta}
    inserted = 0
    routings: dict = {}
    for node in list(graph.nodes):
        sites = node.meta.get("fxlens.sites")
        if not sites:
            continue
        by_name = {s[0]: s for s in sites}
        todo = [by_name[n] for n in canonical_order(by_name) if n not in existing
                and (only is None or n in only)]
        if not todo:
            continue
        # the node's consumers before hooks: chained hooks pass the value along
        cur = node
        for name, layout, edge_users in todo:
            users = [u for u in cur.users] if edge_users is None else \
                [u for u in edge_users if u in cur.users]
            gm.get_submodule(CONTAINER).add_module(name.replace(".", "__"), HookPoint(name, layout))
            args = (cur,)
            if layout.needs_batch:
                args = (cur, _batch_node(graph))
            elif layout.needs_routing:
                args = (cur, _routing_node(graph, node.meta["fxlens.routing"], routings))
            with graph.inserting_after(cur if cur.op != "placeholder" else _last_placeholder(graph)):
                h = graph.call_module(hook_target(name), args)
            h.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack")})
            h.meta["fxlens.site"] = name
            h.meta["fxlens.created_by"] = NAME
            for u in users:
                u.replace_input_with(cur, h)
            if edge_users is None:
                cur = h
            inserted += 1
    # invariant: each site name appears on exactly one hook node, and each HookPoint
    # is called by one node (a site fires once per call, with one shape)
    names = [n.meta["fxlens.site"] for n in graph.nodes if "fxlens.site" in n.meta]
    calls = [n.target for n in graph.nodes if n.op == "call_module" and n.target.startswith(CONTAINER + ".")]
    for what, seq in (("sites hooked twice", names), ("hook points called twice", calls)):
        if len(seq) != len(set(seq)):
            raise PassError(NAME, f"{what}: {sorted({n for n in seq if seq.count(n) > 1})}")
    graph.lint()
    gm.recompile()
    return PassResult(NAME, matched=inserted)


def _routing_node(graph: fx.Graph, routing: tuple[fx.Node, fx.Node], made: dict) -> fx.Node:
    """An MoE's routing as one [2, pairs] tensor (sorted expert ids, flat pair
    indices), the second input of its experts' HookPoints (Layout "expert");
    one node per routing, right after the later of the two."""
    if routing not in made:
        ids, flat = routing
        last = max(routing, key=lambda n: list(graph.nodes).index(n))
        with graph.inserting_after(last):
            made[routing] = graph.call_function(torch.ops.aten.stack.default, ([ids, flat],))
        made[routing].meta.update({"nn_module_stack": dict(ids.meta.get("nn_module_stack", {})),
                                   "fxlens.created_by": NAME})
    return made[routing]


def _last_placeholder(graph: fx.Graph) -> fx.Node:
    return [n for n in graph.nodes if n.op == "placeholder"][-1]


def remove_hooks(gm: fx.GraphModule) -> PassResult:
    """The inverse of insert_hooks, for passes that must see the bare graph again.

    Matches  every HookPoint node (`meta["fxlens.site"]`).
    Rewrites x -> hook(name) -> users   becomes   x -> users
             (the site annotations `meta["fxlens.sites"]` stay on their nodes, so
             insert_hooks puts the same sites back; the HookPoint modules stay in
             the container until insert_hooks replaces them).
    Invariant: no HookPoint node remains.
    """
    graph = gm.graph
    removed = 0
    for node in list(graph.nodes):
        if node.op == "call_module" and "fxlens.site" in node.meta:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
    left = [n.name for n in graph.nodes if n.op == "call_module" and "fxlens.site" in n.meta]
    if left:
        raise PassError("remove_hooks", f"hook nodes remain: {left[:3]}")
    graph.lint()
    gm.recompile()
    return PassResult("remove_hooks", matched=removed)
