"""refactor_factored_attn_matrices: an even, orthogonal factorisation of QK and OV.

Matches   per block W_Q, W_K (with b_Q, b_K as an extra input row), W_V, W_O,
          through the column maps of index tracing.
Rewrites  W_QK = [W_Q; b_Q] [W_K; b_K]^T = U S Vh  ->  W_Q|b_Q = U sqrt(S), W_K|b_K = Vh^T sqrt(S);
          W_OV = W_V W_O = U S Vh  ->  W_V = U S, W_O = Vh, b_V -> 0 with
          b_O += b_V W_O (TransformerLens's refactor: W_O becomes a rotation).
Requires  discover_sites; no rotary embedding (QK then depends on position) and
          no grouped kv heads (K and V are shared between query heads).
Invariant each head's QK and OV products are unchanged.
"""

from __future__ import annotations

import torch

from fxlens.errors import PassError, ProcessingError, UnmappableModelError
from fxlens.ir.pass_result import PassResult
from fxlens.discovery.columns import b_qkv, w_o, w_qkv

NAME = "refactor_factored_attn_matrices"


def _even(a: torch.Tensor, b: torch.Tensor):
    """A B = (U sqrt S)(sqrt S Vh): both factors with equal column norms."""
    u, s, vh = torch.linalg.svd(a @ b)
    r = a.shape[-1]
    root = s[..., :r].sqrt()
    return u[..., :r] * root[..., None, :], root[..., :, None] * vh[..., :r, :]


def _write_rows(gm, lin, cols, w_tl, b_tl, log):
    """Write TransformerLens-shaped [head, d_model, d_head] weights back into a projection."""
    w = lin.weight(gm).clone()
    w[cols] = w_tl.permute(0, 2, 1).to(w.dtype)
    lin.set_weight(gm, w, NAME, log)
    if b_tl is not None:
        b = lin.bias(gm)
        if b is None:
            b = torch.zeros(w.shape[0], dtype=w.dtype)
        b = b.clone()
        b[cols] = b_tl.to(b.dtype)
        if not lin.set_bias(gm, b, NAME, log):
            raise PassError(NAME, f"{lin.node.name} cannot take a bias")


def refactor_factored_attn_matrices(gm, spec, log, maps) -> PassResult:
    # every block is checked (a model may mix rotary and NoPE layers, or head counts)
    rotary = [b.layer for b in spec.blocks if b.rotary]
    if rotary:
        raise ProcessingError(f"{NAME}: the model uses rotary embeddings (blocks {rotary}), so QK depends "
                              f"on position and cannot be refactored; leave this option off")
    grouped = [b.layer for b in spec.blocks if b.n_kv_heads != b.n_heads]
    if grouped:
        raise ProcessingError(f"{NAME}: grouped kv heads (blocks {grouped}) share K and V between query "
                              f"heads; leave this option off")
    for b, m in zip(spec.blocks, maps):
        try:
            (q_lin, q_cols), (k_lin, k_cols), (v_lin, v_cols), (o_lin, o_cols) = (
                m.get(r, f"{NAME}: block {b.layer}") for r in "qkvo")
        except UnmappableModelError as exc:
            raise ProcessingError(f"{exc}; leave this option off") from exc
        wq, wk = w_qkv(gm, q_lin, q_cols).double(), w_qkv(gm, k_lin, k_cols).double()
        bq, bk = b_qkv(gm, q_lin, q_cols).double(), b_qkv(gm, k_lin, k_cols).double()
        # QK with the biases as an extra (always-1) input row: [head, d_model+1, d_head]
        q_eff = torch.cat([wq, bq[:, None, :]], dim=1)
        k_eff = torch.cat([wk, bk[:, None, :]], dim=1)
        q_new, kt_new = _even(q_eff, k_eff.transpose(-2, -1))
        k_new = kt_new.transpose(-2, -1)
        _write_rows(gm, q_lin, q_cols, q_new[:, :-1], q_new[:, -1], log)
        _write_rows(gm, k_lin, k_cols, k_new[:, :-1], k_new[:, -1], log)
        # OV: fold b_V into b_O first, then W_V W_O = (U S)(Vh)
        wv, wo = w_qkv(gm, v_lin, v_cols).double(), w_o(gm, o_lin, o_cols).double()
        bv = b_qkv(gm, v_lin, v_cols).double()
        b_o = o_lin.bias(gm)
        b_o = (b_o.double() if b_o is not None else torch.zeros(wo.shape[-1], dtype=torch.float64))
        b_o = b_o + torch.einsum("hd,hdm->m", bv, wo)
        u, s, vh = torch.linalg.svd(wv @ wo)
        r = wv.shape[-1]
        _write_rows(gm, v_lin, v_cols, u[..., :r] * s[..., None, :r], torch.zeros_like(bv), log)
        w = o_lin.weight(gm).clone()                     # [d_model, head*d_head]
        w[:, o_cols] = vh[..., :r, :].permute(2, 0, 1).to(w.dtype)
        o_lin.set_weight(gm, w, NAME, log)
        if not o_lin.set_bias(gm, b_o.to(w.dtype), NAME, log):
            raise PassError(NAME, f"{o_lin.node.name} cannot take a bias")
    gm.recompile()
    return PassResult(NAME, matched=len(spec.blocks))
