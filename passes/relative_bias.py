"""relative_bias: ALiBi scores relative to the query, as TransformerLens has them.

Matches   `s = baddbmm(bias, q, k^T, beta=beta, alpha=alpha)` whose bias is made from
          positions alone (`fxlens.ir.graph.position_bias`) and holds one row per
          batch*head, `[b*h, 1, k]`: BLOOM's ALiBi, `slope_h * key_pos`.
Rewrites  s  ->  s - beta * bias[:, :, k-q:]^T      (`[b*h, q, 1]`: the bias at each
          query's own key; with a KV cache the q queries are the last q keys)
          so the scores the softmax reads are `q.k * alpha + slope_h * (key_pos -
          query_pos)`, TransformerLens's ALiBi, and `hook_attn_scores` (the softmax
          input, found by discovery afterwards) holds them. Each query row loses one
          constant, which the softmax cancels: the pattern, z and logits are HF's
          to float rounding.
Requires  nothing; runs before site discovery. Only a baddbmm whose product reaches
          a softmax over its last (key) dimension through layout ops, casts, adds
          (the mask) and scalings is matched; a bias of any other shape (one per
          query row), one made from a parameter (a learned bias: RecurrentGemma's
          gates), or beta=0 (the bias unused) is left as it is.
Invariant every matched baddbmm is read only by its subtraction (and its own sizes).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxlens.errors import PassError
from fxlens.ir.graph import SOFTMAX_OPS, ancestors, is_layout, is_param, new_node, position_bias, shape
from fxlens.ir.pass_result import PassResult

aten = torch.ops.aten
NAME = "relative_bias"
END = 2 ** 63 - 1   # aten.slice's "to the end"
# what may sit between QK^T (+ bias) and the softmax: the mask's add, a scaling, casts
_BETWEEN = {aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.to.dtype, aten._to_copy.default,
            aten.masked_fill.Scalar, aten.masked_fill.Tensor}


def _reaches_softmax(mm: fx.Node) -> bool:
    """The product reaches a softmax over its last (key) dimension through layout
    ops, casts, adds and scalings only."""
    todo, seen = [mm], set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if u.op == "call_function" and u.target in SOFTMAX_OPS:
                rank = len(shape(u) or ())
                if u.args[0] is n and u.args[1] in (-1, rank - 1):
                    return True
            elif u.op == "call_function" and (is_layout(u) or u.target in _BETWEEN):
                todo.append(u)
    return False


def relative_bias(gm: fx.GraphModule) -> PassResult:
    graph = gm.graph
    matched = []
    for mm in [n for n in graph.nodes if n.op == "call_function" and n.target is aten.baddbmm.default]:
        bias = position_bias(mm)
        if bias is None or len(shape(bias) or ()) != 3 or shape(bias)[1] != 1:
            continue
        if any("fxlens.relative_bias" in u.meta for u in mm.users):
            continue   # already relative
        if mm.kwargs.get("beta", 1) == 0 or not _reaches_softmax(mm) or \
                any(is_param(a) for a in ancestors(bias) | {bias}):
            continue
        beta = mm.kwargs.get("beta", 1)
        users = list(mm.users)
        with graph.inserting_after(mm):
            q = new_node(graph, aten.sym_size.int, (mm, 1), like=mm, origin=NAME)
        with graph.inserting_after(q):
            k = new_node(graph, aten.sym_size.int, (mm, 2), like=mm, origin=NAME)
        with graph.inserting_after(k):
            start = new_node(graph, operator.sub, (k, q), like=mm, origin=NAME)
        with graph.inserting_after(start):
            own = new_node(graph, aten.slice.Tensor, (bias, 2, start, END), like=mm, origin=NAME)
        with graph.inserting_after(own):
            own_t = new_node(graph, aten.transpose.int, (own, 1, 2), like=mm, origin=NAME)
        last = own_t
        if beta != 1:
            with graph.inserting_after(last):
                last = new_node(graph, aten.mul.Tensor, (own_t, beta), like=mm, origin=NAME)
        with graph.inserting_after(last):
            rel = new_node(graph, aten.sub.Tensor, (mm, last), like=mm, origin=NAME)
        rel.meta["fxlens.relative_bias"] = bias.name
        for u in users:
            u.replace_input_with(mm, rel)
        if set(mm.users) != {rel, q, k}:       # the subtraction and its own two sizes
            raise PassError(NAME, f"{mm.name} is still read by "
                                  f"{[u.name for u in mm.users if u not in (rel, q, k)]}")
        matched.append(mm.name)
    if matched:
        graph.lint()
        gm.recompile()
    return PassResult(NAME, matched=len(matched), details={"scores": matched} if matched else {})
