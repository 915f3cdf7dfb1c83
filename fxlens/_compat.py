"""Version workarounds, each with its reason. Nothing else in fxlens branches on versions."""

from __future__ import annotations

import torch
import torch.fx as fx


def set_eager_attention(model) -> None:
    """Site discovery needs the attention softmax as an explicit node; SDPA and
    flash kernels hide it. transformers 5 switches with `set_attn_implementation`;
    older releases only read `config._attn_implementation`."""
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
            return
        except Exception:  # some models refuse the switch; fall back to the config field
            pass
    model.config._attn_implementation = "eager"


def plain_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """`ExportedProgram.module()` wraps the graph in pytree flattening, a shape
    guard submodule and the `use_cache` flag. fxlens calls the graph with a
    token tensor and checks shapes itself, so strip those three."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "placeholder" and not node.users and node.target != "input_ids":
            graph.erase_node(node)
    graph._codegen = fx.graph.CodeGen()
    out = graph.output_node()
    flat = out.args[0]
    if isinstance(flat, (tuple, list)):
        logits = flat[0]
        out.args = (logits,)
    graph.lint()
    new = fx.GraphModule(gm, graph)
    return new


def export_dims(n_ctx: int):
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=max(2, n_ctx))
    return batch, seq
