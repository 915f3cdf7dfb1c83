"""expose_norms: make every norm's scale and normalized value a node of its own.

Matches
  - `aten.layer_norm(x, [d], w, b, eps)` (LayerNorm, one node), and
  - `mul(x, rsqrt(mean(x*x, -1) + eps))` (the RMSNorm chain, rsqrt also spelt
    `pow(., -0.5)` as Gemma 4 does; the weight, or Gemma's `1 + w`, is applied by
    later nodes that stay as they are), and
  - `aten.rms_norm(x, [d], w, eps)`.
Rewrites
  layer_norm(x)           -> c = x - mean(x); scale = sqrt(mean(c*c) + eps);
                             normalized = c / scale; normalized * w + b
  x * rsqrt(v + eps)      -> scale = sqrt(v + eps); normalized = x / scale
Requires nothing; site discovery reads the result: the new nodes carry
`meta["fxlens.norm"]` (the norm module's path), `meta["fxlens.norm_kind"]`
("LN" or "RMS") and `meta["fxlens.norm_part"]` ("scale" / "normalized"), which
is how TransformerLens's `hook_scale` / `hook_normalized` (taken before the
norm's own weight and bias) are found.
Invariant: no `aten.layer_norm` / `aten.rms_norm` node remains, and every norm
has exactly one scale and one normalized node.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxlens.errors import PassError
from fxlens.ir.graph import module_path, new_node, val
from fxlens.ir.pass_result import PassResult

aten = torch.ops.aten
NAME = "expose_norms"


def _tag(node: fx.Node, path: str, kind: str, part: str) -> None:
    node.meta["fxlens.norm"] = path
    node.meta["fxlens.norm_kind"] = kind
    node.meta["fxlens.norm_part"] = part


def _rewrite_layer_norm(graph: fx.Graph, ln: fx.Node) -> None:
    x, shape_, w, b, eps = (list(ln.args) + [None, None, 1e-5])[:5]
    if len(shape_) != 1:
        raise PassError(NAME, f"{ln.name} normalises over {len(shape_)} dims; only the last "
                              f"dim is supported. Use from_pretrained_no_processing on another model")
    path = module_path(ln)
    with graph.inserting_before(ln):
        # [batch, pos, d_model] -> centred, then scale = sqrt(mean(c^2) + eps)  [batch, pos, 1]
        mean = new_node(graph, aten.mean.dim, (x, [-1], True), like=ln, origin=NAME)
        c = new_node(graph, aten.sub.Tensor, (x, mean), like=ln, origin=NAME)
        sq = new_node(graph, aten.mul.Tensor, (c, c), like=ln, origin=NAME)
        var = new_node(graph, aten.mean.dim, (sq, [-1], True), like=ln, origin=NAME)
        var_eps = new_node(graph, aten.add.Tensor, (var, eps), like=ln, origin=NAME)
        scale = new_node(graph, aten.sqrt.default, (var_eps,), like=ln, origin=NAME)
        normalized = new_node(graph, aten.div.Tensor, (c, scale), like=ln, origin=NAME)
        out = normalized
        if w is not None:
            out = new_node(graph, aten.mul.Tensor, (out, w), like=ln, origin=NAME)
        if b is not None:
            out = new_node(graph, aten.add.Tensor, (out, b), like=ln, origin=NAME)
    _tag(scale, path, "LN", "scale")
    _tag(normalized, path, "LN", "normalized")
    ln.replace_all_uses_with(out)
    graph.erase_node(ln)


def _rewrite_rms_norm(graph: fx.Graph, rms: fx.Node) -> None:
    x, shape_, w, eps = (list(rms.args) + [None, None, None])[:4]
    eps = 1e-6 if eps is None else eps
    path = module_path(rms)
    with graph.inserting_before(rms):
        sq = new_node(graph, aten.mul.Tensor, (x, x), like=rms, origin=NAME)
        var = new_node(graph, aten.mean.dim, (sq, [-1], True), like=rms, origin=NAME)
        var_eps = new_node(graph, aten.add.Tensor, (var, eps), like=rms, origin=NAME)
        scale = new_node(graph, aten.sqrt.default, (var_eps,), like=rms, origin=NAME)
        normalized = new_node(graph, aten.div.Tensor, (x, scale), like=rms, origin=NAME)
        out = normalized
        if w is not None:
            out = new_node(graph, aten.mul.Tensor, (out, w), like=rms, origin=NAME)
    _tag(scale, path, "RMS", "scale")
    _tag(normalized, path, "RMS", "normalized")
    rms.replace_all_uses_with(out)
    graph.erase_node(rms)


def _is_mean_square_of(node, x) -> bool:
    """node == mean(x*x, -1, keepdim) or mean(x**2, -1, keepdim)."""
    if not isinstance(node, fx.Node) or node.target is not aten.mean.dim:
        return False
    sq = node.args[0]
    if not isinstance(sq, fx.Node):
        return False
    if sq.target is aten.pow.Tensor_Scalar and sq.args[1] == 2:
        return sq.args[0] is x
    if sq.target is aten.mul.Tensor:
        return sq.args[0] is x and sq.args[1] is x
    return False


def _match_rms_chain(mul: fx.Node):
    """mul(x, rsqrt(add(mean(x*x), eps))) -> (x, var_eps, rsqrt) or None; Gemma 4
    spells rsqrt as pow(., -0.5)."""
    if mul.target is not aten.mul.Tensor or len(mul.args) != 2:
        return None
    for x, r in (mul.args, mul.args[::-1]):
        if isinstance(r, fx.Node) and (r.target is aten.rsqrt.default
                                       or (r.target is aten.pow.Tensor_Scalar and r.args[1] == -0.5)):
            var_eps = r.args[0]
            if isinstance(var_eps, fx.Node) and var_eps.target is aten.add.Tensor:
                if any(_is_mean_square_of(a, x) for a in var_eps.args):
                    return x, var_eps, r
    return None


def _rewrite_rms_chain(graph: fx.Graph, mul: fx.Node, x, var_eps, rsqrt) -> None:
    path = module_path(rsqrt)
    with graph.inserting_before(mul):
        scale = new_node(graph, aten.sqrt.default, (var_eps,), like=mul, origin=NAME)
        normalized = new_node(graph, aten.div.Tensor, (x, scale), like=mul, origin=NAME)
    _tag(scale, path, "RMS", "scale")
    _tag(normalized, path, "RMS", "normalized")
    mul.replace_all_uses_with(normalized)
    graph.erase_node(mul)
    if not rsqrt.users:
        graph.erase_node(rsqrt)


def expose_norms(gm: fx.GraphModule) -> PassResult:
    graph = gm.graph
    counts = {"LN": 0, "RMS": 0}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.layer_norm.default:
            _rewrite_layer_norm(graph, node)
            counts["LN"] += 1
        elif node.target is aten.rms_norm.default:
            _rewrite_rms_norm(graph, node)
            counts["RMS"] += 1
        else:
            m = _match_rms_chain(node)
            if m is not None:
                _rewrite_rms_chain(graph, node, *m)
                counts["RMS"] += 1
    # invariant: no fused norm op left, one scale and one normalized per exposed norm
    left = [n.name for n in graph.nodes if n.target in (aten.layer_norm.default, aten.rms_norm.default)]
    if left:
        raise PassError(NAME, f"fused norm nodes remain after the pass: {left}")
    parts = {}
    for n in graph.nodes:
        if "fxlens.norm_part" in n.meta:
            parts.setdefault(n.meta["fxlens.norm"], []).append(n.meta["fxlens.norm_part"])
    for path, ps in parts.items():
        if ps.count("scale") != ps.count("normalized"):
            raise PassError(NAME, f"norm {path} exposes {ps}: a scale and a normalized value per call")
    graph.lint()
    gm.recompile()
    return PassResult(NAME, matched=counts["LN"] + counts["RMS"], details=counts)
