"""Weights under TransformerLens's names and shapes, read from the (processed) graph.

The views read through the column maps (`fxlens.discovery.columns`): which
stored weight entries make up each head's W_Q/W_K/W_V and W_O and the MLP's
W_in/W_gate/W_out.

Shapes (TransformerLens): W_Q [head, d_model, d_head], W_O [head, d_head, d_model],
W_in/W_gate [d_model, d_mlp], W_out [d_mlp, d_model], W_E [d_vocab, d_model],
W_U [d_model, d_vocab]; stacked over layers on `model`, per layer on `model.blocks[L]`.
"""

from __future__ import annotations

import torch

from fxlens.errors import NotApplicableError
from fxlens.interp.editable import read_only, read_param, stack
from fxlens.ir.graph import site_node
from fxlens.ir.params import Linear, get_tensor
from fxlens.ir.trace import apply_chain, values_at
from fxlens.discovery.columns import BlockMaps, column_maps


def _oriented(lin: Linear):
    """Reads a projection's stored weight as HF's [out, in] (Conv1D stores [in, out])."""
    return (lambda t: t) if lin.parts.out_in else (lambda t: t.t())


class BlockWeights:
    """`model.blocks[L]` views: `.attn.W_Q`, `.mlp.W_in`, ... (and `.W_Q` directly).

    Each view is an `EditableWeight` (fxlens/interp/editable.py): in-place edits
    (`W_O[h] = 0`, `W_Q.zero_()`) are written back to the graph's parameters.
    """

    def __init__(self, model, layer: int):
        self._model, self.layer = model, layer
        self.attn = self.mlp = self

    def _m(self) -> BlockMaps:
        return self._model._maps()[self.layer]

    def _gm(self):
        return self._model.graph_module

    def _name(self, what: str) -> str:
        return f"blocks.{self.layer}.{what}"

    def _weight(self, what: str, lin: Linear, read) -> torch.Tensor:
        """read: [out, in] weight -> TransformerLens layout."""
        orient = _oriented(lin)
        return read_param(get_tensor(self._gm(), lin.parts.w.target), lambda t: read(orient(t)),
                          self._name(what))

    def _bias(self, what: str, lin: Linear, read=lambda t: t) -> torch.Tensor:
        b = lin.parts.b
        if b is None:
            w = lin.weight(self._gm())
            zeros = read(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            return read_only(zeros, self._name(what),
                             "this projection has no bias parameter (the zeros shown are stored nowhere); "
                             "add a vector with a hook on the projection's output site instead")
        return read_param(get_tensor(self._gm(), b.target), read, self._name(what))

    def _qkv(self, role: str, what: str, repeat: bool = False):
        lin, cols = self._m().get(role, self._name(what))        # cols [head, d_head]
        rep = self._model.cfg.n_heads // cols.shape[0] if repeat else 1
        # [out, d_model] -> [head, d_head, d_model] -> [head, d_model, d_head] (kv heads repeated)
        return self._weight(what, lin, lambda w: _repeat(w[cols].permute(0, 2, 1), rep))

    def _qkv_bias(self, role: str, what: str, repeat: bool = False):
        lin, cols = self._m().get(role, self._name(what))
        rep = self._model.cfg.n_heads // cols.shape[0] if repeat else 1
        return self._bias(what, lin, lambda b: _repeat(b[cols], rep))

    @property
    def _W_K(self): return self._qkv("k", "attn._W_K")
    @property
    def _W_V(self): return self._qkv("v", "attn._W_V")
    @property
    def _b_K(self): return self._qkv_bias("k", "attn._b_K")
    @property
    def _b_V(self): return self._qkv_bias("v", "attn._b_V")
    @property
    def W_Q(self): return self._qkv("q", "attn.W_Q")
    @property
    def W_K(self): return self._qkv("k", "attn.W_K", repeat=True)
    @property
    def W_V(self): return self._qkv("v", "attn.W_V", repeat=True)
    @property
    def b_Q(self): return self._qkv_bias("q", "attn.b_Q")
    @property
    def b_K(self): return self._qkv_bias("k", "attn.b_K", repeat=True)
    @property
    def b_V(self): return self._qkv_bias("v", "attn.b_V", repeat=True)

    @property
    def W_O(self):
        lin, cols = self._m().get("o", self._name("attn.W_O"))   # input columns [head, d_head]
        # [d_model, head*d_head] -> [d_model, head, d_head] -> [head, d_head, d_model]
        return self._weight("attn.W_O", lin, lambda w: w[:, cols].permute(1, 2, 0))

    @property
    def b_O(self):
        self._m().get("o", self._name("attn.b_O"))      # refuses a block without attention
        o_proj = site_node(self._gm(), self._model.spec.blocks[self.layer].o_proj)
        return self._bias("attn.b_O", Linear(o_proj))

    def _mlp(self, role):
        entry = self._m().get(role, self._name(f"mlp ({role})"))
        if entry is None:
            raise AttributeError(f"block {self.layer} has no {role} projection (MoE or not gated)")
        return entry

    def _in_role(self) -> str:
        m = self._m()
        return "pre_linear" if m.pre_linear or "pre_linear" in m.unmapped else "pre"

    @property
    def W_in(self):
        lin, cols = self._mlp(self._in_role())
        return self._weight("mlp.W_in", lin, lambda w: w[cols].T)           # [d_model, d_mlp]
    @property
    def b_in(self):
        lin, cols = self._mlp(self._in_role())
        return self._bias("mlp.b_in", lin, lambda b: b[cols])
    @property
    def W_gate(self):
        if self._in_role() != "pre_linear":
            raise AttributeError("W_gate: this MLP is not gated")
        lin, cols = self._mlp("pre")
        return self._weight("mlp.W_gate", lin, lambda w: w[cols].T)
    @property
    def W_out(self):
        lin, cols = self._mlp("out")
        return self._weight("mlp.W_out", lin, lambda w: w[:, cols].T)       # [d_mlp, d_model]
    @property
    def b_out(self):
        return self._bias("mlp.b_out", self._mlp("out")[0])

    @property
    def QK(self):
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self):
        return FactoredMatrix(self.W_V, self.W_O)


def _repeat(t: torch.Tensor, rep: int) -> torch.Tensor:
    return t.repeat_interleave(rep, dim=0) if rep > 1 else t


class FactoredMatrix:
    """A low-rank product A @ B kept as its factors (TransformerLens's FactoredMatrix,
    reduced to what QK / OV circuits use)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"FactoredMatrix: inner dims differ, {tuple(A.shape)} @ {tuple(B.shape)}")
        self.A, self.B = A, B

    @property
    def AB(self) -> torch.Tensor:
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        return self.B @ self.A

    @property
    def shape(self):
        return torch.Size([*torch.broadcast_shapes(self.A.shape[:-2], self.B.shape[:-2]),
                           self.A.shape[-2], self.B.shape[-1]])

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):
            return FactoredMatrix(self.A, self.B @ other.AB)
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other):
        return FactoredMatrix(other @ self.A, self.B)

    def svd(self):
        """U, S, Vh of A @ B without forming it: via the QR of each factor."""
        qa, ra = torch.linalg.qr(self.A)
        qb, rb = torch.linalg.qr(self.B.transpose(-2, -1))
        u, s, vh = torch.linalg.svd(ra @ rb.transpose(-2, -1))
        return qa @ u, s, (qb @ vh.transpose(-2, -1)).transpose(-2, -1)

    @property
    def S(self) -> torch.Tensor:
        return self.svd()[1]

    @property
    def eigenvalues(self) -> torch.Tensor:
        return torch.linalg.eigvals(self.BA)

    def norm(self) -> torch.Tensor:
        return self.S.pow(2).sum(-1).sqrt()

    def __getitem__(self, idx) -> "FactoredMatrix":
        return FactoredMatrix(self.A[idx], self.B[idx])

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)})"


class WeightsMixin:
    """Stacked TransformerLens weight views on the HookedModel."""

    def _maps(self) -> list[BlockMaps]:
        # traced once per graph module: the maps name their projections by spec handle
        # (looked up when read, so opt-in rewrites of the graph keep them right) and the
        # columns depend only on the parameters' layouts, which processing keeps
        cached = getattr(self, "_maps_cache", None)
        if cached is None or cached[0] is not self.graph_module:
            self._maps_cache = (self.graph_module, column_maps(self.graph_module, self.spec))
        return self._maps_cache[1]

    @property
    def blocks(self) -> list[BlockWeights]:
        return [BlockWeights(self, i) for i in range(self.cfg.n_layers)]

    def _stack(self, attr: str) -> torch.Tensor:
        # [layer, ...]: edits are written back to each layer's parameters
        views = [getattr(b, attr) for b in self.blocks]
        shapes = [tuple(v.shape) for v in views]
        if len(set(shapes)) > 1:   # blocks of other widths (cfg fields that are PerLayer)
            raise NotApplicableError(
                f"{attr}: the blocks' {attr} differ in shape ({', '.join(map(str, shapes))}), so they make "
                f"no one [layer, ...] tensor; read model.blocks[L].{attr} for each layer")
        return stack(views, attr)

    W_Q = property(lambda self: self._stack("W_Q"))
    W_K = property(lambda self: self._stack("W_K"))
    W_V = property(lambda self: self._stack("W_V"))
    W_O = property(lambda self: self._stack("W_O"))
    b_Q = property(lambda self: self._stack("b_Q"))
    b_K = property(lambda self: self._stack("b_K"))
    b_V = property(lambda self: self._stack("b_V"))
    b_O = property(lambda self: self._stack("b_O"))
    W_in = property(lambda self: self._stack("W_in"))
    # None when the MLP is not gated, as TransformerLens (a block's own W_gate raises)
    W_gate = property(lambda self: self._stack("W_gate") if self.cfg.gated_mlp else None)
    W_out = property(lambda self: self._stack("W_out"))
    b_in = property(lambda self: self._stack("b_in"))
    b_out = property(lambda self: self._stack("b_out"))
    QK = property(lambda self: FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1)))
    OV = property(lambda self: FactoredMatrix(self.W_V, self.W_O))

    # W_E, W_U and existing biases are views of the stored tensors (no copy)
    @property
    def W_E(self) -> torch.Tensor:
        gm = self.graph_module
        embed = site_node(gm, self.spec.embed)
        w = get_tensor(gm, embed.args[0].target).detach()
        out = site_node(gm, self.spec.embed_out) if self.spec.embed_out is not None else embed
        if out is embed:
            return w
        # TransformerLens folds the embedding's scale (Gemma's sqrt(d_model)) into W_E
        return read_only(apply_chain(gm, embed, out, w), "W_E",
                         "W_E includes the scale the model applies to its embedding, so it is stored "
                         "nowhere; edit the embedding parameter of the HF model, or hook hook_embed")

    def _unembed(self) -> Linear:
        return Linear(site_node(self.graph_module, self.spec.unembed))

    @property
    def W_U(self) -> torch.Tensor:
        return self._unembed().weight(self.graph_module).detach().T   # [d_model, d_vocab]

    @property
    def b_U(self) -> torch.Tensor:
        lin = self._unembed()
        b = lin.bias(self.graph_module)
        if b is not None:
            return b.detach()
        w = lin.weight(self.graph_module)
        return read_only(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), "b_U",
                         "the unembedding has no bias parameter (the zeros shown are stored nowhere)")

    @property
    def W_pos(self) -> torch.Tensor:
        """[n_ctx, d_model]: the vector each position adds (read off the position
        embedding's output, so offsets like OPT's are already applied)."""
        if self.spec.pos_embed is None:
            raise AttributeError("W_pos: this model has no learned position embedding")
        pos_embed = site_node(self.graph_module, self.spec.pos_embed)
        return read_only(values_at(self.graph_module, pos_embed, self.cfg.n_ctx), "W_pos",
                         "W_pos is read off the position embedding's output, not stored as one tensor; "
                         "change positions with a hook on hook_pos_embed")
