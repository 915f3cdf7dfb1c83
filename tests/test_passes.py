"""Passes on tiny graphs: what each matches, rewrites and checks, one at a time."""

import types

import torch
from torch import nn

from fxlens.ir.graph import add_handle
from fxlens.ir.params import ProcessingLog
from fxlens.passes import center_unembed, expose_norms, fold_ln

# float32, a handful of ops: the rewritten graph differs by rounding only
ATOL = 1e-5


class _Tiny(nn.Module):
    """LayerNorm and an RMSNorm (Gemma's 1 + w) each feeding a linear."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.rms_w = nn.Parameter(torch.randn(8) * 0.1)
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(6, 5, bias=False)
        with torch.no_grad():
            self.ln.weight.normal_(1, 0.2)
            self.ln.bias.normal_(0, 0.2)

    def forward(self, x):
        h = self.a(self.ln(x))                                   # [batch, 6]
        var = h.pow(2).mean(-1, keepdim=True)
        h = (h * torch.rsqrt(var + 1e-6)) * (1 + self.rms_w[:6])
        return self.b(h)


def _export():
    model = _Tiny().eval()
    x = torch.randn(3, 8)
    gm = torch.export.export(model, (x,), strict=False).module()
    return model, gm, x


def test_expose_norms_counts_and_numbers():
    model, gm, x = _export()
    result = expose_norms(gm)
    assert result.details == {"LN": 1, "RMS": 1}
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.layer_norm.default not in ops and torch.ops.aten.rsqrt.default not in ops
    parts = sorted(n.meta["fxlens.norm_part"] for n in gm.graph.nodes if "fxlens.norm_part" in n.meta)
    assert parts == ["normalized", "normalized", "scale", "scale"]
    assert torch.allclose(gm(x), model(x), atol=ATOL)


def test_fold_ln_on_a_tiny_graph():
    model, gm, x = _export()
    expose_norms(gm)
    norms = {n.meta["fxlens.norm"]: n.meta["fxlens.norm_kind"] for n in gm.graph.nodes if "fxlens.norm" in n.meta}
    log = ProcessingLog()
    result = fold_ln(gm, types.SimpleNamespace(norm_kinds=norms), log)
    assert result.matched == 1          # the LayerNorm feeds a linear; the inline RMS chain has no module
    assert torch.allclose(gm(x), model(x), atol=ATOL)
    # invariant: no parameter is read between the LayerNorm's normalized value and the linear
    assert set(log.changed) == {"a.weight", "a.bias"}
    w = dict(gm.named_parameters())["a.weight"]
    assert torch.allclose(w.mean(1), torch.zeros(6), atol=ATOL)   # LN readers centred over d_model


def test_center_unembed_on_a_tiny_graph():
    model, gm, x = _export()
    unembed = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default
                   and n.args[1].target == "b.weight")
    add_handle(unembed, "unembed")      # the spec names nodes by handle
    log = ProcessingLog()
    assert center_unembed(gm, types.SimpleNamespace(unembed="unembed"), log).matched == 1
    got, want = gm(x), model(x)
    assert torch.allclose(got.log_softmax(-1), want.log_softmax(-1), atol=ATOL)   # log-probs kept
    assert torch.allclose(got.mean(-1), torch.zeros(3), atol=ATOL)                 # logits centred
    assert not torch.allclose(got, want, atol=1e-3)


def test_relative_bias_matches_only_a_positional_score_bias():
    """relative_bias rewrites a baddbmm whose bias is made from positions and whose
    product is softmaxed over keys (ALiBi), and leaves a learned bias (RecurrentGemma's
    gates: a parameter, no softmax) alone. The rewrite changes each query row by one
    constant, so the softmax output is unchanged (float32 rounding: 1e-6)."""
    from fxlens.passes import relative_bias

    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b = torch.nn.Parameter(torch.randn(4, 8))
            self.w = torch.nn.Parameter(torch.randn(4, 8, 8))

        def forward(self, x):
            return torch.baddbmm(self.b[:, None, :], x, self.w)

    class LearnedIntoSoftmax(Gate):
        def forward(self, x):
            return torch.softmax(super().forward(x), -1)

    class Alibi(torch.nn.Module):
        def forward(self, q, k):
            bias = torch.arange(k.shape[-1], dtype=q.dtype).expand(q.shape[0], 1, -1) * 0.5
            return torch.softmax(torch.baddbmm(bias, q, k), -1)

    x = torch.randn(4, 3, 8)
    for m in (Gate(), LearnedIntoSoftmax()):
        gm = torch.export.export(m, (x,)).module()
        assert relative_bias(gm).matched == 0, type(m).__name__
    q, k = torch.randn(4, 5, 8), torch.randn(4, 8, 5)
    gm = torch.export.export(Alibi(), (q, k)).module()
    want = gm(q, k)
    assert relative_bias(gm).matched == 1
    assert torch.allclose(gm(q, k), want, atol=1e-6)
