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
    # runtime metadata asserts: no value, and they would count as users of the
    # tensors site discovery follows
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    _functionalize_inplace(graph)
    out = graph.output_node()
    flat = out.args[0]
    if isinstance(flat, (tuple, list)):
        logits = flat[0]
        out.args = (logits,)
    graph.lint()
    new = fx.GraphModule(gm, graph)
    return new


def _functional_variant(op):
    """aten.add_.Tensor -> aten.add.Tensor, for in-place ops that have one."""
    if not isinstance(op, torch._ops.OpOverload):
        return None
    packet = op.overloadpacket.__name__
    if not packet.endswith("_") or packet.startswith("_"):
        return None
    functional = getattr(torch.ops.aten, packet[:-1], None)
    return getattr(functional, op._overloadname, None) if functional is not None else None


def _functionalize_inplace(graph: fx.Graph) -> None:
    """Non-strict export keeps in-place ops (Falcon: `mlp_output += attention_output`),
    which would silently change a cached activation after its hook ran. Rewrite
    `y = x.add_(z)` to `y = add(x, z)` and make every later reader of x read y."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        functional = _functional_variant(node.target) if node.op == "call_function" else None
        if functional is None:
            continue
        mutated = node.args[0]
        node.target = functional
        for user in list(mutated.users):
            if user is not node and order.get(user, -1) > order[node]:
                user.replace_input_with(mutated, node)


def export_dims(n_ctx: int):
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=max(2, n_ctx))
    return batch, seq
