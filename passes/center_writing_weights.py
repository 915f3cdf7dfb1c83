"""center_writing_weights: make everything written to the residual stream mean-zero.

Matches   the writers of the residual stream: the token and position embeddings,
          each attention's output projection and each MLP's output projection.
Rewrites  W_E -> W_E - mean_d(W_E); W_pos likewise;
          o_proj(W, b) -> (W - mean_d W, b - mean(b)) (mean over d_model), same for
          the MLP's W_out. Every reader of the stream is a LayerNorm, which
          removes the mean anyway, so outputs are unchanged.
Requires  discover_sites; only for LayerNorm models (as TransformerLens), and
          only where the writer reaches the residual add through layout ops
          (a post-norm in between would not commute); an embedding only where its
          output reaches the stream's first norm through ops that commute with
          removing the mean (layout, adds, scalar scales): one mixed by a linear
          first (RoCBert's map_inputs_layer) is skipped with the op named.
Invariant every rewritten writer's output has mean ~0 over d_model.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxlens.errors import PassError
from fxlens.ir.graph import is_layout, is_scalar_scale, module_paths, site_node
from fxlens.ir.params import Linear, get_tensor, set_param
from fxlens.ir.pass_result import PassResult

NAME = "center_writing_weights"


def _center_embedding(gm, node, log) -> None:
    w_node = node.args[0]
    w = get_tensor(gm, w_node.target)
    set_param(gm, w_node, node, w - w.mean(-1, keepdim=True), NAME, log)


_ADDS = {torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor}


def _mean_breaking_op(gm, spec, node: fx.Node) -> fx.Node | None:
    """The first op between `node` (an embedding) and the residual stream's readers
    that does not commute with subtracting the mean over d_model (a linear mixing
    the embedding, a concatenation), or None. The walk stops at norms and at the
    stream entering block 0, from where each block's writers are checked."""
    norms = set(spec.norm_kinds)
    stop = {site_node(gm, spec.blocks[0].resid_pre)} if spec.blocks else set()
    todo, seen = list(node.users), set()
    while todo:
        n = todo.pop()
        if n in seen or n in stop:
            continue
        seen.add(n)
        if norms & set(module_paths(n)):
            continue
        if not (n.op == "call_module" or is_layout(n) or is_scalar_scale(n) or n.target in _ADDS):
            return n
        todo.extend(n.users)
    return None


def _center_linear(gm, handle: str, log) -> None:
    Linear(site_node(gm, handle)).center_outputs(gm, NAME, log)   # W_O / W_out stored [d_model, in]


def center_writing_weights(gm, spec, log) -> PassResult:
    kinds = set(spec.norm_kinds.values())
    if kinds != {"LN"}:
        reason = f"the model's norms are {sorted(kinds)}, not LayerNorm: centring would change outputs"
        log.skipped.append(f"{NAME}: {reason}")
        return PassResult(NAME, matched=0, skipped=(reason,))
    skipped, n = [], 0
    for handle in (spec.embed, spec.pos_embed):
        if handle is None:
            continue
        node = site_node(gm, handle)
        op = _mean_breaking_op(gm, spec, node)
        if op is not None:
            skipped.append(f"{node.name}: the embedding reaches the residual stream through {op.name} "
                           f"({op.target}), which does not commute with removing its mean; left as it is")
            continue
        _center_embedding(gm, node, log)
        n += 1
    for b in spec.blocks:
        if not b.has_attn:
            if b.mixer is not None:
                skipped.append(f"block {b.layer}: the token mixer {b.mixer} (no attention) is left as it is")
        elif b.ln1_post is None:
            _center_linear(gm, b.o_proj, log)
            n += 1
        else:
            skipped.append(f"block {b.layer}: attention output passes {b.ln1_post}")
        if b.writer is not None and b.ln2_post is None:
            _center_linear(gm, b.writer, log)
            n += 1
        elif b.has_mlp:
            skipped.append(f"block {b.layer}: MLP output is not one linear (MoE) or passes a post-norm")
    # invariant: the rewritten output projections write mean-zero vectors
    for b in spec.blocks:
        if not b.has_attn:
            continue
        o_proj = site_node(gm, b.o_proj)
        if b.ln1_post is None and not Linear(o_proj).outputs_centred(gm):
            raise PassError(NAME, f"{o_proj.name}: W_O still has a mean component")
    log.skipped.extend(f"{NAME}: {s}" for s in skipped)
    gm.recompile()
    return PassResult(NAME, matched=n, skipped=tuple(skipped))
