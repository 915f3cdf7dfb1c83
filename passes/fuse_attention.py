"""fuse_attention: explicit attention -> one scaled_dot_product_attention node.

Matches  with torch.fx's SubgraphMatcher, patterns traced (fx.symbolic_trace)
         from the reference attention below, one per combination of
    scores = matmul(q, kT)                       q [b, h, s, d], kT [b, h, d, s']
    scores = scores * c   |  scores / c  | -     (c a Python number)
    scores = scores + mask | mask + scores | -   (HF's additive mask, 0 where
                                                  allowed, dtype-min where not)
    p      = softmax(scores, -1[, dtype]) | _softmax(scores, -1, False)
    p      = to(p, dtype) [-> dropout(p, 0 / train=False)] | dropout | clone | -
                                                 (the casts the sweep's models have:
                                                  HF's eager_attention_forward)
    z      = matmul(p, v)                        v [b, h, s', d]
         Every trailing argument of the pattern is a placeholder, so the match
         captures it (c, dim, dtypes, dropout p) and `_refuse` checks it.
Rewrites  the matched chain -> z = aten.scaled_dot_product_attention(q, k, v,
          attn_mask=mask, dropout_p=0, is_causal=False, scale=c or 1/c or 1.0)
          (k = kT's transpose input, or a new transpose(kT, -2, -1)).
          GQA needs nothing: eager graphs repeat k and v to all heads before
          the matmuls, so q, k and v already agree on the head count.
Skips (reported in `PassResult.skipped`, labelled by block; it keeps its explicit form)
  - a value of the chain is observed: a HookPoint sits in it (a user hook on
    hook_attn_scores / hook_pattern) or it has another user (a cached site is
    an extra graph output) -- run `specialise` first so that only observed
    sites keep a trace. The patterns are matched on a copy of the graph with
    its observers taken out (hooks bypassed, extra outputs and export's
    metadata checks dropped), so an observed attention is still found and the
    skip says which site observes it;
  - a pattern matched but an argument does not fit sdpa (active dropout, a
    softmax over another dim or in another dtype, a mask of another dtype);
  - a 4-D softmax no pattern matches: logit soft-capping (tanh), ALiBi
    (baddbmm), a 3-D bmm.
Numbers: the same maths, evaluated by a fused kernel that normalises the
softmax blockwise (online softmax); float32 results move by ~1e-6 of their
size (tests allow 1e-4 relative, as for the TransformerLens oracle).
Requires specialise (on the copy that is compiled).
Invariant: each fused attention has no softmax and no pattern@V matmul left,
and one sdpa node each.

torch.fx's other tools did not fit: `replace_pattern_with_filters` replaces
silently (no reason for an attention it leaves, which `skipped` reports per
block), drops the matched nodes' meta (`val`, which segmenting and the
dtype checks read, and `nn_module_stack`), and cannot erase export's
metadata checks that read the chain; `get_source_partitions` groups nodes by
the torch function or module that made them (matmul, softmax, dropout each a
partition of its own: HF's attention is a function, not a module), so no
partition spans one attention.
"""

from __future__ import annotations

import functools
import itertools
import numbers

import torch
import torch.fx as fx
from torch.fx.passes.utils.matcher_utils import InternalMatch, SubgraphMatcher

from fxlens.errors import PassError
from fxlens.ir.graph import SOFTMAX_OPS, val
from fxlens.ir.pass_result import PassResult

aten = torch.ops.aten
NAME = "fuse_attention"

# side-effect-free checks export leaves behind; they may read chain values
_CHECKS = {aten._assert_tensor_metadata.default}


# --- the reference attention the patterns are traced from -----------------------------
def _scaled_mul(s, scale):
    return aten.mul.Tensor(s, scale)


def _scaled_div(s, scale):
    return aten.div.Tensor(s, scale)


def _masked_right(s, mask):
    return aten.add.Tensor(s, mask)


def _masked_left(s, mask):
    return aten.add.Tensor(mask, s)


def _softmax(s, dim, dtype):
    return aten.softmax.int(s, dim, dtype)


def _softmax_internal(s, dim, dtype):
    return aten._softmax.default(s, dim, dtype)     # dtype: half_to_float


def _cast(p, cast_dtype, drop_p, train, fmt):
    return aten.to.dtype(p, cast_dtype)


def _dropout(p, cast_dtype, drop_p, train, fmt):
    return aten.dropout.default(p, drop_p, train)


def _clone(p, cast_dtype, drop_p, train, fmt):
    return aten.clone.default(p, memory_format=fmt)


SCALES = (None, _scaled_mul, _scaled_div)
MASKS = (None, _masked_right, _masked_left)
SOFTMAXES = (_softmax, _softmax_internal)
CASTS = ((), (_cast,), (_cast, _dropout), (_dropout,), (_clone,))


def reference_attention(scale_op, mask_op, softmax_op, casts):
    """softmax(q @ kT [scaled] [+ mask]) [cast] @ v, as the HF eager graphs write it."""
    def attention(q, kt, v, mask, scale, dim, dtype, cast_dtype, drop_p, train, fmt):
        s = aten.matmul.default(q, kt)
        if scale_op is not None:
            s = scale_op(s, scale)
        if mask_op is not None:
            s = mask_op(s, mask)
        p = softmax_op(s, dim, dtype)
        for cast in casts:
            p = cast(p, cast_dtype, drop_p, train, fmt)
        return aten.matmul.default(p, v)
    return attention


@functools.cache
def patterns() -> tuple[fx.Graph, ...]:
    """One traced graph per variant of the reference attention (unused inputs dropped:
    the matcher refuses a pattern with dead nodes)."""
    out = []
    for options in itertools.product(SCALES, MASKS, SOFTMAXES, CASTS):
        graph = fx.symbolic_trace(reference_attention(*options)).graph
        for n in list(graph.nodes):
            if n.op == "placeholder" and not n.users:
                graph.erase_node(n)
        out.append(graph)
    return tuple(out)


# --- matching ------------------------------------------------------------------------------
class _Attention:
    """One matched attention: the graph's nodes for the pattern's inputs (`args`,
    by the reference's argument names) and for its ops (`nodes`, users first)."""

    def __init__(self, match: InternalMatch, back: dict):
        args, nodes = {}, []
        for pn, gn in match.nodes_map.items():
            gn = back.get(gn, gn) if isinstance(gn, fx.Node) else gn
            if pn.op == "placeholder":
                args[pn.target] = gn
            elif pn.op == "call_function":
                nodes.append((pn, gn))
        self.args = args
        self.pattern_of = {gn: pn for pn, gn in nodes}
        self.nodes = [gn for _, gn in sorted(nodes, key=lambda x: -_order(x[0]))]   # z first
        self.z = self.nodes[0]
        self.softmax = next(n for n in self.nodes if n.target in SOFTMAX_OPS)
        self.back = back


def _order(pn: fx.Node) -> int:
    return list(pn.graph.nodes).index(pn)


def _unobserved_copy(graph: fx.Graph) -> tuple[fx.Graph, dict]:
    """A copy of `graph` without observers (HookPoints bypassed, only the first
    output kept, export's checks dropped), and the copy -> original node map."""
    copy, val_map = fx.Graph(), {}
    out = copy.graph_copy(graph, val_map)
    first = out[0] if isinstance(out, (tuple, list)) else out
    copy.output((first,))
    back = {new: old for old, new in val_map.items()}
    for n in list(copy.nodes):
        if n.target in _CHECKS:
            copy.erase_node(n)
        elif n.op == "call_module" and "fxlens.site" in n.meta:
            n.replace_all_uses_with(n.args[0])
            copy.erase_node(n)
    # what fed only the dropped outputs goes (a copy: nothing in it runs, so all is pure)
    copy.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))
    return copy, back


def find_attentions(graph: fx.Graph) -> list[_Attention]:
    """Every attention of `graph` some pattern matches, observed or not."""
    copy, back = _unobserved_copy(graph)
    found, claimed = [], set()
    for pattern in patterns():
        for match in SubgraphMatcher(pattern).match(copy):
            att = _Attention(match, back)
            if claimed.isdisjoint(att.nodes):
                claimed.update(att.nodes)
                found.append(att)
    position = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(found, key=lambda a: position[a.z])


class _NoMatch(Exception):
    """Why one attention was left explicit (becomes a `skipped` entry)."""


def _tensor(node) -> bool:
    return isinstance(node, fx.Node) and isinstance(val(node), torch.Tensor)


def _observers(att: _Attention) -> None:
    """Raise _NoMatch when a value of the chain is observed in the real graph: a node
    outside the chain reads it, or a HookPoint sits between two of its ops."""
    inside = set(att.nodes)
    mapped = {pn: gn for gn, pn in att.pattern_of.items()}
    after_softmax = _order(att.pattern_of[att.softmax])
    for gn in att.nodes:
        pn = att.pattern_of[gn]
        for p_arg in pn.all_input_nodes:
            if p_arg.op == "call_function" and mapped[p_arg] not in gn.all_input_nodes:
                hook = next((x for x in gn.all_input_nodes if x not in inside and x.op == "call_module"), None)
                what = hook.name if hook is not None else f"another value than {mapped[p_arg].name}"
                if _order(p_arg) >= after_softmax:
                    raise _NoMatch(f"pattern@V reads {what}, not a softmax (is hook_pattern hooked?)")
                raise _NoMatch(f"{' / '.join(_sites(mapped[p_arg])) or mapped[p_arg].name} is observed "
                               f"(hooked: {gn.name} reads {what})")
        if gn is att.z:
            continue
        others = [u for u in gn.users if u not in inside and u.target not in _CHECKS]
        if others:
            what = "cached" if any(u.op == "output" or "fxlens.cache_of" in u.meta for u in others) else \
                "read by " + ", ".join(u.name for u in others)
            raise _NoMatch(f"{' / '.join(_sites(gn)) or gn.name} is observed ({what})")


def _sites(node: fx.Node) -> list[str]:
    return [s[0] for s in node.meta.get("fxlens.sites", ())]


def _refuse(att: _Attention) -> None:
    """Raise _NoMatch when a captured argument does not fit sdpa's maths."""
    a = att.args
    if "scale" in a and (not isinstance(a["scale"], numbers.Number) or isinstance(a["scale"], bool)):
        raise _NoMatch("the scores are scaled by a tensor, not a number")
    if "drop_p" in a and a["drop_p"] != 0 and a["train"]:
        raise _NoMatch("dropout is active (train mode)")
    if att.softmax.target is aten._softmax.default and a["dtype"]:
        raise _NoMatch(f"{att.softmax.name} converts half to float")
    s = att.softmax.args[0]
    if not _tensor(s) or a["dim"] not in (-1, val(s).dim() - 1):
        raise _NoMatch(f"{att.softmax.name} is not over the last dim")
    for role in ("q", "kt", "v"):
        if not _tensor(a[role]) or val(a[role]).dim() != 4:
            raise _NoMatch(f"{'k^T' if role == 'kt' else role} is not a 4-D tensor")
    vq = val(a["q"])
    if "mask" in a:
        vm = val(a["mask"]) if _tensor(a["mask"]) else None
        if vm is None or vm.dtype != vq.dtype or vm.dim() > 4:
            what = f"{vm.dtype} {tuple(vm.shape)}" if vm is not None else repr(a["mask"])
            raise _NoMatch(f"mask {getattr(a['mask'], 'name', '')} is {what}; sdpa wants {vq.dtype}")
    if not vq.dtype == val(a["v"]).dtype == val(att.z).dtype == val(att.softmax).dtype:
        raise _NoMatch("softmax runs in another dtype than q/k/v")


def _unmatched_reason(softmax: fx.Node) -> str:
    """Why no pattern matched the attention of a 4-D `softmax`: the ops on the
    shortest path back to the scores' matmul that the reference attention lacks."""
    parent, todo = {softmax.args[0]: None}, [softmax.args[0]]
    while todo:
        n = todo.pop(0)
        if n.target is aten.matmul.default:
            path = []
            while n is not None:
                if n.op == "call_module" or n.target not in (aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor,
                                                               aten.matmul.default):
                    path.append(_op(n))
                n = parent[n]
            if path:
                return (f"scores pass through {', '.join(reversed(path))} (logit soft-capping?); "
                        f"no attention pattern matches it and sdpa cannot express it")
            return _after_softmax(softmax)
        for arg in n.all_input_nodes:
            if arg not in parent and arg.op in ("call_function", "call_module") and _tensor(arg) \
                    and val(arg).dim() == 4:
                parent[arg] = n
                todo.append(arg)
    return f"{softmax.name}: no attention pattern matches its scores, and they come from no 4-D matmul"


def _op(n: fx.Node) -> str:
    """A node's op as messages name it: aten.tanh.default, getitem, or a HookPoint's node."""
    if n.op == "call_module":
        return n.name
    text = str(n.target)              # aten ops print as aten.x.overload, Python functions as <...>
    return getattr(n.target, "__name__", text) if text.startswith("<") else text


def _after_softmax(softmax: fx.Node) -> str:
    """The ops between a softmax and its pattern@V matmul, when no pattern passes them."""
    ops, n = [], softmax
    while len(ops) < 6:
        users = [u for u in n.users if u.target not in _CHECKS]
        if len(users) != 1:
            break
        (n,) = users
        if n.target is aten.matmul.default:
            break
        ops.append(_op(n))
    return (f"pattern@V reads the softmax through {', '.join(ops) or 'other users'} (active dropout?); "
            f"no attention pattern passes it")


def _label(nodes) -> str | None:
    """'blocks.N' from the sites annotated on an attention's nodes."""
    for n in nodes:
        for site in _sites(n):
            if site.startswith("blocks."):
                return ".".join(site.split(".")[:2])
    return None


# --- the pass ------------------------------------------------------------------------------
def fuse_attention(gm: fx.GraphModule) -> PassResult:
    """Fuse every attention of `gm` that a pattern matches and nobody observes."""
    graph = gm.graph
    attentions = find_attentions(graph)
    covered = {att.softmax for att in attentions}
    softmaxes = [n for n in graph.nodes if n.target in SOFTMAX_OPS and _tensor(n) and val(n).dim() == 4]
    skipped, todo = [], []
    for att in attentions:
        try:
            _observers(att)
            _refuse(att)
        except _NoMatch as why:
            skipped.append((att.softmax, f"{_label(att.nodes) or att.z.name}: {why}"))
            continue
        todo.append(att)
    for softmax in softmaxes:
        if softmax not in covered:
            skipped.append((softmax, f"{_label([softmax, softmax.args[0]]) or softmax.name}: "
                                     f"{_unmatched_reason(softmax)}"))
    position = {n: i for i, n in enumerate(graph.nodes)}
    fused = [(att, _rewrite(graph, att)) for att in todo]
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    # invariant: each fused attention's softmax is gone and its sdpa node is in the graph
    live = set(graph.nodes)
    for att, sdpa in fused:
        if att.softmax in live or sdpa not in live:
            raise PassError(NAME, f"{_label([sdpa]) or sdpa.name}: the explicit attention survived the rewrite")
    skipped.sort(key=lambda x: position[x[0]])
    return PassResult(NAME, matched=len(fused), details={"attentions": len(softmaxes)},
                      skipped=tuple(why for _, why in skipped))


def _rewrite(graph: fx.Graph, att: _Attention) -> fx.Node:
    a, z = att.args, att.z
    scale = 1.0
    if "scale" in a:
        op = att.pattern_of[next(n for n in att.nodes if att.pattern_of[n].target in
                                 (aten.mul.Tensor, aten.div.Tensor))].target
        scale = float(a["scale"]) if op is aten.mul.Tensor else 1.0 / float(a["scale"])
    with graph.inserting_before(z):
        k = _untranspose(a["kt"])
        if k is None:
            # k^T [.., d, s'] -> k [.., s', d]
            k = graph.call_function(aten.transpose.int, (a["kt"], -2, -1))
        # softmax(q k^T * scale + mask) v, in one kernel
        sdpa = graph.call_function(aten.scaled_dot_product_attention.default,
                                   (a["q"], k, a["v"], a.get("mask"), 0.0, False), {"scale": scale})
    sdpa.meta.update({key: z.meta[key] for key in ("val", "nn_module_stack") if key in z.meta})
    sdpa.meta["fxlens.created_by"] = NAME
    z.replace_all_uses_with(sdpa)
    # the explicit chain and export's metadata checks on it go (users before producers;
    # dropout counts as impure for dead-code elimination)
    for n in att.nodes:
        for u in list(n.users):
            if u.target in _CHECKS:
                graph.erase_node(u)
    for n in att.nodes:
        graph.erase_node(n)
    return sdpa


def _untranspose(kt: fx.Node) -> fx.Node | None:
    """k from k^T when k^T is transpose(k, -2, -1); None means "insert a transpose"."""
    if isinstance(kt, fx.Node) and kt.target is aten.transpose.int and _tensor(kt):
        r = val(kt).dim()
        if {d % r for d in kt.args[1:3]} == {r - 2, r - 1}:
            return kt.args[0]
    return None
