"""place_devices: run each node on the device of the module that produced it.

Matches: every node of a captured graph whose parameters already sit where a
device map put them (`fxlens.placement`), exported on the meta device.
Rewrites:
  - device arguments baked in at export (`arange(..., device=meta)`,
    `to(..., device=meta)`, `to(mask, meta, bool)`, `zeros(...)`) -> the node's device;
  - a tensor read on another device than its reader's ->
    `x` -> `_to_copy(x, device=d)` -> reader (one copy per value and device).
A node's device is that of its innermost module placed by the map (longest
prefix of its `nn_module_stack` path); a node outside every placed module
(mask building in the model's body, a view of a parameter) runs where its
first tensor input lives, and one with no tensor input on `default`.
Requires: nothing before it (it runs as the last step of capture). Invariant:
no `device=meta` argument remains.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxlens.errors import PassError
from fxlens.ir.graph import module_paths, val
from fxlens.ir.pass_result import PassResult

aten = torch.ops.aten


def _placed_device(node: fx.Node, module_devices: dict[str, torch.device]) -> torch.device | None:
    for path in reversed(module_paths(node)):
        d = _lookup(path, module_devices)
        if d is not None:
            return d
    return None


def _lookup(path: str, module_devices: dict[str, torch.device]) -> torch.device | None:
    """Longest key of `module_devices` that is `path` or a dotted prefix of it."""
    parts = path.split(".") if path else []
    for i in range(len(parts), -1, -1):
        d = module_devices.get(".".join(parts[:i]))
        if d is not None:
            return d
    return None


def place_devices(gm: fx.GraphModule, module_devices: dict[str, torch.device],
                  default: torch.device) -> PassResult:
    graph = gm.graph
    dev: dict[fx.Node, torch.device] = {}
    copies: dict[tuple[fx.Node, torch.device], fx.Node] = {}
    rewritten = 0
    for node in list(graph.nodes):
        if node.op == "placeholder":
            dev[node] = default
            continue
        if node.op == "get_attr":
            attr = _attr(gm, node.target)
            dev[node] = attr.device if isinstance(attr, torch.Tensor) else default
            continue
        if node.op == "output":
            continue
        inputs = [a for a in node.all_input_nodes if val(a) is not None]
        if node.target is operator.getitem:          # a part of a tuple lives where the tuple does
            dev[node] = dev.get(node.args[0], default)
            continue
        here = _placed_device(node, module_devices)
        if here is None:
            here = dev.get(inputs[0], default) if inputs else default
        dev[node] = here
        if isinstance(node.kwargs.get("device"), torch.device) and node.kwargs["device"] != here:
            node.kwargs = {**node.kwargs, "device": here}
            rewritten += 1
        # positional too: `mask.to(device, torch.bool)` is aten.to.device(mask, device, dtype)
        if any(isinstance(a, torch.device) and a != here for a in node.args):
            node.args = tuple(here if isinstance(a, torch.device) else a for a in node.args)
            rewritten += 1
        for a in inputs:
            if dev.get(a, here) == here:
                continue
            key = (a, here)
            if key not in copies:
                with graph.inserting_before(node):
                    c = graph.call_function(aten._to_copy.default, (a,), {"device": here})
                c.meta = {k: v for k, v in a.meta.items() if k in ("val", "nn_module_stack")}
                c.meta["fxlens.created_by"] = "place_devices"
                copies[key] = c
            node.replace_input_with(a, copies[key])
    left = [n.name for n in graph.nodes
            if any(isinstance(a, torch.device) and a.type == "meta" for a in (*n.args, n.kwargs.get("device")))]
    if left:
        raise PassError("place_devices", f"nodes {left[:5]} still create tensors on the meta device")
    gm.recompile()
    return PassResult("place_devices", matched=rewritten + len(copies),
                      details={"device_args": rewritten, "copies": len(copies),
                               "devices": sorted({str(d) for d in dev.values()})})


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
