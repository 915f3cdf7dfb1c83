"""HookPoint: the module a hook site becomes in the graph.

A site's node may hold its value in another layout than TransformerLens's
(q as [batch, head, pos, d_head], or flat [batch, pos, head*d_head]); the
HookPoint shows hooks the TransformerLens layout and maps a returned tensor
back. With no hook attached it returns its input untouched.

`Layout.to_tl` / `from_tl` are the one definition of each mapping: the eager
HookPoint calls them, and `emit_layout` writes the same functions into a graph
as ATen nodes (traced with `make_fx`), which is how compiled variants return
cached values in TransformerLens layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from fxlens.errors import HookReturnError


@dataclass(frozen=True)
class Layout:
    """How a node's value maps to the TransformerLens layout of its site.

    kind: "same" | "bhsd" ([b, h, s, d] <-> [b, s, h, d]) | "flat" ([b, s, h*d]
    <-> [b, s, h, d]) | "scores" (additive mask -> -inf, like TransformerLens) |
    "batch" ([1, s, d] broadcast over the batch, for position embeddings) |
    "folded" ([b*h, q, k] <-> [b, h, q, k]: scores or pattern with the heads folded
    into the batch for a bmm, XGLM's) | "folded_scores" (that, and "scores"'s mask) |
    "tokens" ([b*s, d] <-> [b, s, d], where a model flattens batch and pos) |
    "squeeze3" ([b, s, h, 1, d] <-> [b, s, h, d], Falcon's grouped k/v) |
    "rows" ([b, s, h, d] <-> [b*s*h, d]: a per-head q/k norm, which TransformerLens
    applies to the flattened rows) | "bhsd_rows" (the same from [b, h, s, d]) |
    "expert" (the rows of routed expert `expert` out of the [tokens*top_k, d]
    (token, slot) pairs an MoE sorted by expert, in TransformerLens's order: slot,
    then token; see `expert_rows`).

    `aux` is the HookPoint's second input: the batch size ("batch", "tokens") or the
    routing ("expert": [2, tokens*top_k] = the pairs' sorted expert ids and their
    flat (token*top_k + slot) indices).
    """

    kind: str = "same"
    needs_batch = property(lambda self: self.kind in ("batch", "tokens"))
    needs_routing = property(lambda self: self.kind == "expert")
    heads: int = 0
    d_head: int = 0
    # > 1 when the node holds each kv head `group` times over (k repeated to all
    # query heads before rotary, Falcon); hooks see the kv heads once
    group: int = 1
    expert: int = 0
    top_k: int = 0

    def to_tl(self, x: torch.Tensor, batch=None) -> torch.Tensor:
        if self.kind == "expert":
            return x[expert_rows(batch, self.expert, self.top_k)]
        y = self._to_tl(x, batch)
        if self.group > 1:  # [b, s, kv*group, d] -> [b, s, kv, d]: the copies are equal
            y = y.unflatten(2, (-1, self.group))[:, :, :, 0]
        return y

    def from_tl(self, y: torch.Tensor, like: torch.Tensor, aux=None) -> torch.Tensor:
        if self.kind == "expert":
            # the other experts' rows stay as they were
            return like.index_put((expert_rows(aux, self.expert, self.top_k),), y)
        if self.group > 1:
            y = y.repeat_interleave(self.group, dim=2)
        return self._from_tl(y, like)

    def _to_tl(self, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        if self.kind == "bhsd":
            return x.transpose(1, 2)
        if self.kind == "flat":
            return x.unflatten(-1, (self.heads, self.d_head))
        if self.kind == "squeeze3":
            return x.squeeze(3)
        if self.kind in ("folded", "folded_scores"):
            x = x.unflatten(0, (-1, self.heads))
        if self.kind in ("scores", "folded_scores"):
            # HF adds the dtype's minimum at masked positions; TransformerLens shows -inf
            return x.masked_fill(x <= torch.finfo(x.dtype).min / 2, float("-inf"))
        if self.kind == "tokens":
            return x.unflatten(0, (batch, -1))
        if self.kind == "rows":
            return x.flatten(0, -2)
        if self.kind == "bhsd_rows":
            return x.transpose(1, 2).flatten(0, -2)
        if self.kind == "batch" and batch is not None and x.shape[0] != batch:
            return x.expand(batch, *x.shape[1:])
        return x

    def _from_tl(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.kind in ("scores", "folded_scores") and y.is_floating_point():
            # -inf (masked) back to the dtype's minimum: a row masked throughout (a
            # pad query) then softmaxes to finite values instead of NaN
            y = y.clamp_min(torch.finfo(y.dtype).min)
        if self.kind in ("folded", "folded_scores"):
            return y.flatten(0, 1)
        if self.kind == "scores":
            return y
        if self.kind == "bhsd":
            return y.transpose(1, 2)
        if self.kind == "flat":
            return y.flatten(-2)
        if self.kind == "tokens":
            return y.flatten(0, 1)
        if self.kind == "squeeze3":
            return y.unsqueeze(3)
        if self.kind == "rows":
            return y.reshape(like.shape)
        if self.kind == "bhsd_rows":
            b, h, s, d = like.shape
            return y.reshape(b, s, h, d).transpose(1, 2)
        return y


def expert_rows(routing: torch.Tensor, expert: int, top_k: int) -> torch.Tensor:
    """Which rows of an MoE's expert-sorted (token, slot) pairs are expert `expert`'s,
    in TransformerLens's order. `routing` is [2, tokens*top_k]: row 0 the pairs'
    expert ids (sorted), row 1 each pair's flat index token*top_k + slot.
    TransformerLens runs expert E on `torch.where(one_hot(indices)[E])` of the
    [top_k, tokens] mask: the tokens that chose E in slot 0, then in slot 1, ...,
    each by token. A token picks an expert once, so the key slot*tokens + token is
    unique and the order exact."""
    ids, flat = routing[0], routing[1]
    rows = (ids == expert).nonzero().squeeze(1)
    n_tokens = flat.shape[0] // top_k
    key = (flat[rows] % top_k) * n_tokens + flat[rows] // top_k
    return rows[key.argsort()]


# Sample sizes for the symbolic (batch, pos, ...) sizes when tracing a layout:
# distinct, large and prime, so that no symbolic size equals a static one (or
# another symbolic one) by accident and the traced graph reads each size from
# the right dimension. Static sizes (heads, d_head, 1) keep their value.
_SAMPLE_SIZES = (1009, 1013, 1019, 1021, 1031, 1033)


def emit_layout(graph: fx.Graph, layout: Layout, direction: str, x: fx.Node,
                batch: fx.Node | None = None, out_val: torch.Tensor | None = None) -> fx.Node:
    """`layout.to_tl(x, batch)` (direction "to_tl") or `layout.from_tl(x, x)`
    ("from_tl") as ATen nodes inserted at the graph's insertion point; returns
    the result node (`x` itself where the mapping is the identity). The nodes
    come from tracing those very methods, so eager hooks and compiled variants
    cannot disagree. Sizes come from `meta["val"]` of `x` (and `batch`); a
    from_tl input without one takes them from `out_val`, the result's value."""
    if layout.kind == "same" and layout.group == 1:
        return x          # the identity (nodes made by passes may carry no meta["val"])
    if layout.kind == "expert":
        # data-dependent rows: no trace on sample sizes; the method itself, called
        if direction == "to_tl":
            rows = graph.call_function(expert_rows, (batch, layout.expert, layout.top_k))
            return graph.call_function(torch.ops.aten.index.Tensor, (x, [rows]))
        raise ValueError("emit_layout: an expert site maps back only in its HookPoint")
    xv = x.meta.get("val")
    bv = batch.meta["val"] if batch is not None else None
    env = _symbol_samples([v for v in (xv, bv, out_val) if v is not None])
    if xv is not None:
        dtype, shape_x = xv.dtype, _sample_shape(xv, env)
    elif direction == "from_tl" and out_val is not None:
        dtype = out_val.dtype
        like = torch.empty(_sample_shape(out_val, env), dtype=dtype, device="meta")
        shape_x = tuple(layout.to_tl(like).shape)
    else:
        raise ValueError(f"emit_layout: {x.name} has no meta['val'] to size the mapping with")
    sig = (shape_x,) if batch is None or direction != "to_tl" else (shape_x, _sample_int(bv, env))
    traced = _traced_layout(layout, direction, dtype, sig)
    args = iter((x, batch))
    mapping: dict[fx.Node, fx.Node] = {}
    out = x
    for n in traced.graph.nodes:
        if n.op == "placeholder":
            mapping[n] = next(args)
        elif n.op == "output":
            out = fx.map_arg(n.args[0], lambda a: mapping[a])
        else:
            mapping[n] = graph.node_copy(n, lambda a: mapping[a])
            mapping[n].meta = {}
    return out


def _symbol_samples(values) -> dict:
    """Each free symbol of the values' sizes -> a sample size (see _SAMPLE_SIZES)."""
    syms = []
    for v in values:
        for d in (v.shape if isinstance(v, torch.Tensor) else [v]):
            if isinstance(d, torch.SymInt):
                syms += [s for s in sorted(d.node.expr.free_symbols, key=str) if s not in syms]
    return {s: _SAMPLE_SIZES[i % len(_SAMPLE_SIZES)] for i, s in enumerate(syms)}


def _sample_int(d, env) -> int:
    return int(d.node.expr.subs(env)) if isinstance(d, torch.SymInt) else int(d)


def _sample_shape(v: torch.Tensor, env) -> tuple[int, ...]:
    return tuple(_sample_int(d, env) for d in v.shape)


@functools.lru_cache(maxsize=512)
def _traced_layout(layout: Layout, direction: str, dtype: torch.dtype, sig: tuple) -> fx.GraphModule:
    """The layout mapping traced once per (layout, direction, dtype, sample shapes):
    symbolic sizes stay symbolic (read with sym_size), static ones are constants."""
    from torch.fx.experimental.proxy_tensor import make_fx

    examples = [torch.empty(s, dtype=dtype, device="meta") if isinstance(s, tuple) else s for s in sig]
    if direction == "to_tl":
        fn = (lambda x, b: layout.to_tl(x, b)) if len(examples) == 2 else (lambda x: layout.to_tl(x))
    elif direction == "from_tl":
        fn = lambda y: layout.from_tl(y, y)   # noqa: E731  (the mapping back reads only y)
    else:
        raise ValueError(f"direction {direction!r}: use 'to_tl' or 'from_tl'")
    return make_fx(fn, tracing_mode="symbolic")(*examples)


class HookPoint(nn.Module):
    """A named site. `fn(activation, hook) -> tensor | None`; `hook.name` is the site's name.

    `sae_splice`: an SAE attached with `model.add_sae` (fxlens.interp.saes.SAESplice); the
    activation passes through it before the hooks run. `in_graph` is False for the
    hook points of such an SAE (`<site>.hook_sae_acts_post`, ...): they are no node
    of the graph and run inside their site's HookPoint."""

    in_graph = True

    def __init__(self, name: str, layout: Layout = Layout()):
        super().__init__()
        self.name = name
        self.layout = layout
        self.fwd_hooks: list = []   # [(fn, permanent)]
        self.bwd_hooks: list = []   # [(fn, permanent)]: fn(grad, hook) -> tensor | None
        self.ctx: dict = {}         # scratch space for hooks (TransformerLens's hook.ctx)
        self.sae_splice = None

    def clear_context(self) -> None:
        self.ctx = {}

    def layer(self) -> int | None:
        parts = self.name.split(".")
        return int(parts[1]) if parts[0] == "blocks" else None

    def forward(self, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        if not self.fwd_hooks and not self.bwd_hooks and self.sae_splice is None:
            return x
        y = self.layout.to_tl(x, batch)
        if self.sae_splice is not None:
            y = self.sae_splice(y)
        for fn, _ in list(self.fwd_hooks):
            y = self._checked(fn(y, hook=self), y, "activation")
        if self.bwd_hooks and y.requires_grad:
            # a fresh node, so the hooks see the gradient of this site's output only
            y = y.view_as(y)
            for fn, _ in list(self.bwd_hooks):
                y.register_hook(functools.partial(self._run_bwd, fn))
        return self.layout.from_tl(y, x, batch)

    def _run_bwd(self, fn, grad: torch.Tensor) -> torch.Tensor | None:
        out = fn(grad, hook=self)
        return None if out is None else self._checked(out, grad, "gradient")

    def _checked(self, out, like: torch.Tensor, what: str) -> torch.Tensor:
        """A hook's return value: None keeps `like`; a tensor must match it."""
        if out is None:
            return like
        if not isinstance(out, torch.Tensor):
            raise HookReturnError(
                f"hook on {self.name} returned {type(out).__name__}; return a tensor "
                f"shaped {tuple(like.shape)} or None")
        if out.shape != like.shape or out.dtype != like.dtype:
            raise HookReturnError(
                f"hook on {self.name} returned {tuple(out.shape)} {out.dtype}; the {what} "
                f"is {tuple(like.shape)} {like.dtype}, and a replacement must match it")
        return out

    def extra_repr(self) -> str:
        return f"{self.name!r}, layout={self.layout.kind}"
