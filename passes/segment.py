"""segment: cut a specialised graph into compiled pieces with the hooks between them.

Matches  the cut points of a specialised variant (after `specialise`):
  hooked site   a HookPoint node (`meta["fxlens.site"]`): it runs in Python, as
                in the eager model, so whatever function is hooked there (a new
                partial, a lambda in a loop, an `.item()`) changes no compiled code
  boundary      a node with `meta["fxlens.boundary"]` (each block's resid_pre
                value and the last block's resid_post): a segment ends after it.
                `mark_boundaries` sets it, before specialise removes the
                HookPoints it finds those values by
Rewrites the graph  ids -> n1 -> ... -> hook(x) -> ... -> out  into a top-level
  graph of segment calls:
      ids -> segment_0(ids, weights...) -> hook(x) -> segment_1(x, weights...) -> out
  Nodes that read no residual value (masks, rotary tables, position ids)
  run in segment 0, wherever export placed them.
  Each segment is its own GraphModule whose weights are inputs (get_attr
  nodes stay in the top-level graph), so blocks with the same code become ONE
  segment module called with each block's weights: compiled once, whichever
  block is hooked and whichever functions hook it. Values a later segment
  reads (the mask, rotary tables, the batch size) are passed along as outputs.
Key  a segment's code: every node's op, target and arguments, with nodes as
  positions; equal keys compute the same function of their inputs.
Requires specialise (only hooked HookPoints left; no layout modules).
Invariant: every node of the input graph except placeholders, get_attrs, hooked
  sites and the output lies in exactly one segment.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxlens.errors import PassError
from fxlens.ir.pass_result import PassResult

NAME = "segment"
BOUNDARY = "fxlens.boundary"


class Segment(torch.nn.Module):
    """One piece of a segmented variant: `fn(*inputs) -> tuple of outputs`.
    `fn` is the GraphModule itself until a runner swaps in a compiled callable
    (`use`), which segments with the same key may share."""

    def __init__(self, gm: fx.GraphModule, key: str):
        super().__init__()
        self.graph_module = gm
        self.key = key
        self.fn = gm

    def use(self, fn) -> None:
        """Run `fn` (any callable, e.g. a compiled segment) instead of the graph."""
        self._modules.pop("fn", None)
        object.__setattr__(self, "fn", fn)

    def forward(self, *args):
        return self.fn(*args)


def segment_key(graph: fx.Graph) -> str:
    """The code of a segment graph with nodes named by position."""
    pos: dict[fx.Node, int] = {}
    lines = []
    for i, n in enumerate(graph.nodes):
        pos[n] = i
        target = "" if n.op in ("placeholder", "output") else n.target
        lines.append(f"{n.op} {target} {_arg_repr(n.args, pos)} {_arg_repr(n.kwargs, pos)}")
    return "\n".join(lines)


def _arg_repr(a, pos) -> str:
    if isinstance(a, fx.Node):
        return f"%{pos[a]}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg_repr(x, pos) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {_arg_repr(v, pos)}" for k, v in a.items()) + "}"
    if isinstance(a, slice):
        return f"slice({_arg_repr(a.start, pos)}, {_arg_repr(a.stop, pos)}, {_arg_repr(a.step, pos)})"
    return repr(a)


def _is_hook(n: fx.Node) -> bool:
    return n.op == "call_module" and "fxlens.site" in n.meta


def segment(gm: fx.GraphModule) -> tuple[fx.GraphModule, PassResult]:
    """The top-level GraphModule (sharing `gm`'s parameters and HookPoints) whose
    `fxlens_segment_*` submodules are `Segment`s. Returns it and what was cut."""
    graph = gm.graph
    # segment index of each node; None: the node stays in the top-level graph.
    # A node that reads no residual value (the mask, rotary tables, position ids:
    # functions of the inputs alone) goes to segment 0 wherever export put it, so
    # the block segments keep only the block's own work and stay alike.
    part: dict[fx.Node, int | None] = {}
    rank: dict[fx.Node, float] = {}       # where a top-level node runs between segments
    stream: set[fx.Node] = set()          # nodes that read a boundary value or a hook
    idx = 0
    for n in graph.nodes:
        if any(a in stream or a.meta.get(BOUNDARY) or _is_hook(a) for a in n.all_input_nodes):
            stream.add(n)
        if n.op in ("placeholder", "get_attr"):
            part[n], rank[n] = None, -1.0
        elif n.op == "output":
            part[n], rank[n] = None, float("inf")
        elif _is_hook(n):
            part[n], rank[n] = None, idx + 0.5
            idx += 1
        else:
            part[n] = idx if n in stream else 0
            if n.meta.get(BOUNDARY):
                idx += 1
    groups: dict[int, list[fx.Node]] = {}
    for n, p in part.items():
        if p is not None:
            groups.setdefault(p, []).append(n)

    # each segment: its inputs (outer values, in first-use order) and outputs
    pieces = {}
    shared: dict[str, str] = {}       # key -> submodule name
    for p, nodes in groups.items():
        inner = set(nodes)
        inputs: list[fx.Node] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in inner and a not in inputs:
                    inputs.append(a)
        outputs = [n for n in nodes if any(u not in inner for u in n.users)]
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for i, a in enumerate(inputs):
            env[a] = g.placeholder(f"in_{i}")
            if "val" in a.meta:
                env[a].meta["val"] = a.meta["val"]
        for n in nodes:
            env[n] = g.node_copy(n, lambda a: env[a])
        g.output(tuple(env[o] for o in outputs))
        key = segment_key(g)
        name = shared.get(key)
        if name is None:
            name = f"fxlens_segment_{len(shared)}"
            shared[key] = name
            gm.add_submodule(name, Segment(fx.GraphModule(gm, g, class_name="FxlensSegment"), key))
        pieces[p] = (name, inputs, outputs)

    # the top level: placeholders, weights, then segments and hooked sites in turn
    top = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    items = [(rank[n], i, n) for i, n in enumerate(graph.nodes) if part[n] is None]
    items += [(float(p), -1, p) for p in pieces]
    for _, _, item in sorted(items, key=lambda t: (t[0], t[1])):
        if isinstance(item, int):
            name, inputs, outputs = pieces[item]
            call = top.call_module(name, tuple(env[a] for a in inputs))
            for j, o in enumerate(outputs):
                env[o] = top.call_function(operator.getitem, (call, j))
                if "val" in o.meta:
                    env[o].meta["val"] = o.meta["val"]
        elif item.op == "output":
            top.output(fx.map_arg(item.args[0], lambda a: env[a]))
        else:
            env[item] = top.node_copy(item, lambda a: env[a])
    top.lint()
    out = fx.GraphModule(gm, top, class_name="FxlensSegmented")
    # invariant: every computing node is in one segment
    n_inner = sum(len(nodes) for nodes in groups.values())
    n_outer = sum(1 for n in graph.nodes if part[n] is None)
    if n_inner + n_outer != len(graph.nodes):
        raise PassError(NAME, "a node is in no segment or in two")
    hooks = sum(1 for n in graph.nodes if _is_hook(n))
    return out, PassResult(NAME, matched=len(groups),
                           details={"segments": len(groups), "distinct": len(shared), "hooks": hooks})


def mark_boundaries(gm: fx.GraphModule, layers) -> PassResult:
    """meta[BOUNDARY] on the residual value entering each of the blocks `layers`
    (and leaving the last one), read through their hook_resid_pre / hook_resid_post
    HookPoints: segments end there, so blocks compile alike. Run before specialise
    (which removes the unobserved HookPoints)."""
    layers = list(layers)
    names = [f"blocks.{layer}.hook_resid_pre" for layer in layers]
    if layers:
        names.append(f"blocks.{layers[-1]}.hook_resid_post")
    by_site = {n.meta["fxlens.site"]: n for n in gm.graph.nodes
               if n.op == "call_module" and "fxlens.site" in n.meta}
    marked = 0
    for name in names:
        node = by_site.get(name)
        while node is not None and node.op == "call_module" and "fxlens.site" in node.meta:
            node = node.args[0]       # chained hooks (resid_post L-1, resid_pre L) on one value
        if isinstance(node, fx.Node) and node.op != "placeholder":
            node.meta[BOUNDARY] = True
            marked += 1
    return PassResult("mark_boundaries", matched=marked, details={"blocks": len(layers)})
