"""fuse_attention: explicit attention -> one scaled_dot_product_attention node.

Matches, inside each attention (walking back from the block's pattern@V
matmul, `BlockSpec.z`):
    scores = matmul(q, transpose(k, -2, -1))     q [b, h, s, d], k [b, h, s', d]
    scores = scores * c   |  scores / c          (optional; c a Python number)
    scores = scores + mask                       (optional; HF's additive mask,
                                                  0 where allowed, dtype-min where not)
    p      = softmax(scores, -1)
    p      = to(p, dtype) | dropout(p, 0 / train=False) | clone(p)   (any, in any order)
    z      = matmul(p, v)                        v [b, h, s', d]
Rewrites  that chain -> z = aten.scaled_dot_product_attention(q, k, v,
          attn_mask=mask, dropout_p=0, is_causal=False, scale=c or 1/c or 1.0)
          GQA needs nothing: eager graphs repeat k and v to all heads before
          the matmuls, so q, k and v already agree on the head count.
Skips (reported in `PassResult.skipped`, the block keeps its explicit form)
  - a value of the chain is observed: a HookPoint sits in it (a user hook on
    hook_attn_scores / hook_pattern) or it has another user (a cached site is
    an extra graph output) -- run `specialise` first so that only observed
    sites keep a trace;
  - anything else between the matmuls: logit soft-capping (tanh), ALiBi
    (baddbmm), a 3-D bmm, a mask of another dtype.
Numbers: the same maths, evaluated by a fused kernel that normalises the
softmax blockwise (online softmax); float32 results move by ~1e-6 of their
size (tests allow 1e-4 relative, as for the TransformerLens oracle).
Requires specialise (on the copy that is compiled).
Invariant: each fused block has no softmax and no pattern@V matmul left, and
one sdpa node per fused block.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.fx as fx

from fxlens.errors import PassError
from fxlens.ir.graph import SOFTMAX_OPS, val
from fxlens.ir.pass_result import PassResult

aten = torch.ops.aten
NAME = "fuse_attention"

# ops allowed between the softmax and pattern@V (they do not change the values
# in inference: casts to the same dtype, dropout off, copies)
_PASS_THROUGH = {aten.to.dtype, aten._to_copy.default, aten.dropout.default, aten.clone.default,
                 aten.contiguous.default, aten.alias.default, aten.type_as.default}
# side-effect-free checks export leaves behind; they may read chain values
_CHECKS = {aten._assert_tensor_metadata.default}


class _NoMatch(Exception):
    """Why one attention was left explicit (becomes a `skipped` entry)."""


def _only_user(node: fx.Node, user: fx.Node) -> None:
    """`node` feeds `user` and nothing else (checks aside): no site observes it."""
    others = [u for u in node.users if u is not user and u.target not in _CHECKS]
    if others:
        sites = [s[0] for s in node.meta.get("fxlens.sites", ())]
        what = "cached" if any(u.op == "output" or "fxlens.cache_of" in u.meta for u in others) else \
            "read by " + ", ".join(u.name for u in others)
        raise _NoMatch(f"{' / '.join(sites) or node.name} is observed ({what})")


def _tensor(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(val(node), torch.Tensor)


def _match(z: fx.Node) -> dict:
    """The pieces of one explicit attention ending at pattern@V `z`."""
    if z.target is not aten.matmul.default:
        raise _NoMatch(f"{z.name} is {z.target}, not a 4-D matmul")
    p, v = z.args
    chain = []
    # pattern@V <- casts / dropout <- softmax
    while isinstance(p, fx.Node) and p.target in _PASS_THROUGH:
        if p.target is aten.dropout.default and p.args[1] != 0 and p.args[2]:
            raise _NoMatch(f"{p.name}: dropout is active (train mode)")
        _only_user(p, chain[-1] if chain else z)
        chain.append(p)
        p = p.args[0]
    if not isinstance(p, fx.Node) or p.target not in SOFTMAX_OPS:
        what = p.name if isinstance(p, fx.Node) else repr(p)
        raise _NoMatch(f"pattern@V reads {what}, not a softmax (is hook_pattern hooked?)")
    softmax = p
    _only_user(softmax, chain[-1] if chain else z)
    dim = softmax.args[1]
    s = softmax.args[0]
    if not _tensor(s) or dim not in (-1, val(s).dim() - 1):
        raise _NoMatch(f"{softmax.name} is not over the last dim")
    # softmax <- + mask
    mask = None
    nodes = [*chain, softmax]        # users before producers: the order to erase them in
    if s.target in (aten.add.Tensor,) and len(s.args) == 2 and all(_tensor(a) for a in s.args):
        _only_user(s, softmax)
        a, b = s.args
        # the mask is the operand that does not come from a matmul / scale chain
        if not (_from_scores(a) or _from_scores(b)):
            raise _NoMatch(f"scores pass through {_op_before_scale(a)} before the mask "
                           f"(logit soft-capping?); sdpa cannot express it")
        scores_side = a if _from_scores(a) else b
        mask = b if scores_side is a else a
        nodes.append(s)
        s = scores_side
    # <- * scale or / scale
    scale = 1.0
    if s.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(s.args[1], numbers.Number) \
            and not isinstance(s.args[1], bool):
        _only_user(s, nodes[-1])
        c = float(s.args[1])
        scale = c if s.target is aten.mul.Tensor else 1.0 / c
        nodes.append(s)
        s = s.args[0]
    if s.target is not aten.matmul.default:
        what = s.target if isinstance(s, fx.Node) and s.op == "call_function" else s.name
        raise _NoMatch(f"scores come from {what}, not matmul(q, k^T)")
    _only_user(s, nodes[-1])
    nodes.append(s)
    q, kt = s.args
    k = _untranspose(kt)
    for role, t in (("q", q), ("k^T", kt), ("v", v)):
        if not _tensor(t) or val(t).dim() != 4:
            raise _NoMatch(f"{role} is not a 4-D tensor")
    vq, vv = val(q), val(v)
    if mask is not None:
        vm = val(mask)
        if vm.dtype != vq.dtype or vm.dim() > 4:
            raise _NoMatch(f"mask {mask.name} is {vm.dtype} {tuple(vm.shape)}; sdpa wants {vq.dtype}")
    if vq.dtype != vv.dtype or val(z).dtype != vq.dtype or val(softmax).dtype != vq.dtype:
        raise _NoMatch("softmax runs in another dtype than q/k/v")
    return dict(q=q, kt=kt, k=k, v=v, mask=mask, scale=scale, softmax=softmax, nodes=nodes)


def _from_scores(node: fx.Node) -> bool:
    """True when `node` is (a scaled) q @ k^T: the scores side of `scores + mask`."""
    while isinstance(node, fx.Node) and node.target in (aten.mul.Tensor, aten.div.Tensor):
        node = node.args[0]
    return isinstance(node, fx.Node) and node.target is aten.matmul.default


def _op_before_scale(node: fx.Node) -> str:
    while isinstance(node, fx.Node) and node.target in (aten.mul.Tensor, aten.div.Tensor):
        node = node.args[0]
    return str(node.target) if isinstance(node, fx.Node) else repr(node)


def _untranspose(kt: fx.Node) -> fx.Node | None:
    """k from k^T when k^T is transpose(k, -2, -1); None means "insert a transpose"."""
    if isinstance(kt, fx.Node) and kt.target is aten.transpose.int and _tensor(kt):
        r = val(kt).dim()
        if {d % r for d in kt.args[1:3]} == {r - 2, r - 1}:
            return kt.args[0]
    return None


def fuse_attention(gm: fx.GraphModule, z_nodes: Sequence[fx.Node], labels: Sequence[str] = ()) -> PassResult:
    """Fuse every attention whose pattern@V node is in `z_nodes` (one per block;
    `labels` name them in `skipped`, e.g. 'blocks.3')."""
    graph = gm.graph
    labels = list(labels) or [z.name for z in z_nodes]
    fused, skipped = [], []
    for label, z in zip(labels, z_nodes):
        try:
            m = _match(z)
        except _NoMatch as why:
            skipped.append(f"{label}: {why}")
            continue
        with graph.inserting_before(z):
            k = m["k"]
            if k is None:
                # k^T [.., d, s'] -> k [.., s', d]
                k = graph.call_function(aten.transpose.int, (m["kt"], -2, -1))
            # softmax(q k^T * scale + mask) v, in one kernel
            sdpa = graph.call_function(aten.scaled_dot_product_attention.default,
                                       (m["q"], k, m["v"], m["mask"], 0.0, False),
                                       {"scale": m["scale"]})
        sdpa.meta.update({key: z.meta[key] for key in ("val", "nn_module_stack") if key in z.meta})
        sdpa.meta["fxlens.created_by"] = NAME
        z.replace_all_uses_with(sdpa)
        # the explicit chain and export's metadata checks on it go
        for n in [z, *m["nodes"]]:
            for u in list(n.users):
                if u.target in _CHECKS:
                    graph.erase_node(u)
        # the explicit chain goes (dropout counts as impure for dead-code elimination)
        for n in [z, *m["nodes"]]:
            graph.erase_node(n)
        fused.append((label, sdpa, m["softmax"]))
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    # invariant: each fused block's softmax is gone and its sdpa node is in the graph
    live = set(graph.nodes)
    for label, sdpa, softmax in fused:
        if softmax in live or sdpa not in live:
            raise PassError(NAME, f"{label}: the explicit attention survived the rewrite")
    return PassResult(NAME, matched=len(fused), details={"blocks": len(z_nodes)},
                      skipped=tuple(skipped))

