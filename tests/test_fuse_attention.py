"""fuse_attention's patterns on small exported attentions: each variant of the
reference (scale by * or /, or none; mask on either side of the add, or none;
softmax with or without a dtype; the casts after it) fuses into one sdpa node
with the same numbers, and what sdpa cannot express (soft-capping, active
dropout) is left explicit with its reason.

Tolerance: sdpa normalises the softmax blockwise; float32 results move by ~1e-6
of their size, so 1e-5 relative separates that from a wrong scale or mask."""

from __future__ import annotations

import pytest
import torch

from fxlens.passes.fuse_attention import fuse_attention

SDPA = torch.ops.aten.scaled_dot_product_attention.default


class Attention(torch.nn.Module):
    def __init__(self, scale: str, mask: str, cast: str, softcap: bool = False, train: bool = False):
        super().__init__()
        self.scale, self.mask, self.cast, self.softcap, self.train_dropout = scale, mask, cast, softcap, train

    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-2, -1)
        if self.scale == "mul":
            s = s * 0.25
        elif self.scale == "div":
            s = s / 4.0
        if self.softcap:
            s = torch.tanh(s / 50.0) * 50.0
        if self.mask == "right":
            s = s + mask
        elif self.mask == "left":
            s = mask + s
        p = torch.softmax(s, -1, dtype=torch.float32) if self.cast != "none" else torch.softmax(s, -1)
        if self.cast in ("to", "to_dropout"):
            p = p.to(q.dtype)
        if self.cast in ("to_dropout", "dropout"):
            p = torch.nn.functional.dropout(p, p=0.5 if self.train_dropout else 0.0, training=self.train_dropout)
        if self.cast == "clone":
            p = p.clone()
        return p @ v


def exported(module):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 5, 5).masked_fill(torch.ones(5, 5).triu(1).bool(), torch.finfo(torch.float32).min)
    args = (q, k, v, mask)
    gm = torch.export.export(module, args).run_decompositions({}).module()
    return gm, args


@pytest.mark.parametrize("scale", ["mul", "div", "none"])
@pytest.mark.parametrize("mask", ["right", "left", "none"])
@pytest.mark.parametrize("cast", ["to_dropout", "to", "dropout", "clone", "none"])
def test_every_variant_fuses_with_the_same_numbers(scale, mask, cast):
    module = Attention(scale, mask, cast)
    gm, args = exported(module)
    want = module(*args)
    result = fuse_attention(gm)
    assert result.matched == 1 and result.skipped == ()
    assert sum(n.target is SDPA for n in gm.graph.nodes) == 1
    assert not any(n.target in (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default) for n in gm.graph.nodes)
    got = gm(*args)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_soft_capping_stays_explicit():
    gm, args = exported(Attention("mul", "right", "to_dropout", softcap=True))
    result = fuse_attention(gm)
    assert result.matched == 0
    assert len(result.skipped) == 1 and "aten.tanh.default (logit soft-capping?)" in result.skipped[0]


def test_active_dropout_stays_explicit():
    # in train mode export writes native_dropout, which no pattern passes
    module = Attention("mul", "right", "to_dropout", train=True).train()
    gm, _ = exported(module)
    result = fuse_attention(gm)
    assert result.matched == 0
    assert result.skipped == ("softmax: pattern@V reads the softmax through aten.native_dropout.default, "
                              "getitem (active dropout?); no attention pattern passes it",)
