"""Where each head's weights live: per block, which stored weight entries make up
each head's W_Q/W_K/W_V and W_O and the MLP's W_in/W_gate/W_out, found by index
tracing (fxlens/ir/trace.py) -- so fused QKV (GPT-2, GPT-NeoX, Falcon) and fused
gate/up need no per-architecture layout table. A compiler analysis: the passes
(fold_value_biases, refactor_factored_attn_matrices, opt-in sites) and the weight
views (fxlens/interp/weights.py) read it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from fxlens.errors import UnmappableModelError
from fxlens.ir.graph import site_node
from fxlens.ir.params import Linear
from fxlens.ir.trace import NotIndex, trace_indices


@dataclass
class BlockMaps:
    """Per block: projection -> index tensor of its stored output columns (or, for
    o/out, input columns) in TransformerLens order. Each entry names its projection
    by spec handle, looked up in `gm` when read (`get`), so the maps stay right
    while passes rewrite the graph around the projections (attn.hook_result turns
    o_proj into a per-head sum); the columns depend only on the parameters'
    layouts, which no pass changes."""

    gm: object = None
    q: tuple | None = None     # (projection handle, cols [head, d_head])
    k: tuple | None = None
    v: tuple | None = None
    o: tuple | None = None     # (handle, input cols [head, d_head])
    pre: tuple | None = None   # (handle, cols [d_mlp])  -- W_gate for gated MLPs, else W_in
    pre_linear: tuple | None = None  # (handle, cols [d_mlp]) -- W_in of gated MLPs
    out: tuple | None = None   # (handle, input cols [d_mlp])
    # role -> why it has no map: the op between the projection and its site that
    # computes with the values (index tracing's NotIndex), so no column map exists
    unmapped: dict = field(default_factory=dict)
    # role -> why its projection is no TransformerLens weight at all (discovery's
    # BlockSpec.qkv_indirect: MLA's low-rank latents, a k assembled from parts)
    indirect: dict = field(default_factory=dict)
    # why the block has no attention weights at all (a mixer block, an MLP-only block)
    no_attention: str | None = None

    def get(self, role: str, what: str) -> tuple | None:
        """(Linear, cols) of `role` (None where the block has no such projection), or
        an UnmappableModelError naming the op in the way."""
        if role in ("q", "k", "v", "o") and self.no_attention:
            raise UnmappableModelError(
                f"{what}: this block has no attention ({self.no_attention}), so no W_Q/W_K/W_V/W_O. "
                f"Read its output at hook_mixer_out (run_with_cache), or edit it with a hook")
        entry = getattr(self, role)
        if entry is None and role in self.indirect:
            raise UnmappableModelError(
                f"{what}: {self.indirect[role]}, so there are no TransformerLens-shaped "
                f"[head, d_model, d_head] weights for {role}. Read the activations at the sites "
                f"instead (run_with_cache), or edit them with hooks")
        if entry is None and role in self.unmapped:
            raise UnmappableModelError(
                f"{what}: {self.unmapped[role]} lies between the {role} projection and its site and "
                f"computes with the values (not only moves them), so there are no "
                f"TransformerLens-shaped weights for it. Read the activations at the sites instead "
                f"(run_with_cache), or edit them with hooks")
        if entry is None:
            return None
        handle, cols = entry
        return Linear(site_node(self.gm, handle)), cols


def column_maps(gm, spec) -> list[BlockMaps]:
    node = functools.partial(site_node, gm)
    sources, sinks = set(), set()
    for b in spec.blocks:
        for role in "qkv" if b.has_attn else "":
            if role in b.qkv_indirect:
                continue
            site, proj = b.qkv[role]
            sources.add(node(proj))
            sinks.add(node(site))
        if b.has_attn:
            sources.add(node(b.z))
            sinks.add(Linear(node(b.o_proj)).parts.x)
        for role, (site, proj) in b.mlp_proj.items():
            sources.add(node(proj))
            sinks.add(node(site))
        if b.writer is not None:
            sources.add(node(b.post))
            sinks.add(Linear(node(b.writer)).parts.x)
    seen = trace_indices(gm, sources, sinks)
    layouts = {name: lay for n in gm.graph.nodes for name, lay, _ in n.meta.get("fxlens.sites", [])}
    out = []
    for b in spec.blocks:
        m = BlockMaps(gm)
        if not b.has_attn:
            m.no_attention = (f"its token mixer {b.mixer} is a state-space or linear-attention layer"
                              if b.mixer else "it is an MLP-only block")

        def mapped(role, value, make):
            if isinstance(value, NotIndex):
                m.unmapped[role] = repr(value)
            else:
                setattr(m, role, make(value))

        for role in "qkv" if b.has_attn else "":
            site, proj = b.qkv[role]
            if role in b.qkv_indirect:
                m.indirect[role] = b.qkv_indirect[role]
                continue
            lay = layouts[f"blocks.{b.layer}.attn.hook_{role}"]
            # [head, d_head]
            mapped(role, seen[node(site)], lambda v: (proj, lay.to_tl(v, batch=1).reshape(-1, lay.d_head or b.d_head)))
        # z (its own layout, one token) -> which o_proj input column each (head, d) feeds
        if b.has_attn:
            mapped("o", seen[Linear(node(b.o_proj)).parts.x],
                   lambda v: (b.o_proj, inverse_columns(v).reshape(b.n_heads, b.d_head)))
        for role, (site, proj) in b.mlp_proj.items():
            mapped(role, seen[node(site)], lambda v: (proj, v.reshape(-1)))
        if b.writer is not None:
            mapped("out", seen[Linear(node(b.writer)).parts.x], lambda v: (b.writer, inverse_columns(v)))
        out.append(m)
    return out


def inverse_columns(cols: torch.Tensor) -> torch.Tensor:
    """Flat positions -> the column each one came from, inverted."""
    cols = cols.reshape(-1)
    inv = torch.empty_like(cols)
    inv[cols] = torch.arange(cols.numel())
    return inv


# --- reading weights in TransformerLens shapes -------------------------------------

def w_qkv(gm, lin: Linear, cols) -> torch.Tensor:
    """[head, d_model, d_head] from a projection's rows `cols` [head, d_head]."""
    w = lin.weight(gm)                      # [out, d_model]
    return w[cols].permute(0, 2, 1)         # [head, d_head, d_model] -> [head, d_model, d_head]


def b_qkv(gm, lin: Linear, cols) -> torch.Tensor:
    b = lin.bias(gm)
    return b[cols] if b is not None else torch.zeros(cols.shape, dtype=lin.weight(gm).dtype)


def w_o(gm, lin: Linear, cols) -> torch.Tensor:
    """[head, d_head, d_model] from the output projection's input columns."""
    w = lin.weight(gm)                      # [d_model, head*d_head]
    return w[:, cols].permute(1, 2, 0)      # [d_model, head, d_head] -> [head, d_head, d_model]
