"""HookPoint: the module a hook site becomes in the graph.

A site's node may hold its value in another layout than TransformerLens's
(q as [batch, head, pos, d_head], or flat [batch, pos, head*d_head]); the
HookPoint shows hooks the TransformerLens layout and maps a returned tensor
back. With no hook attached it returns its input untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import HookReturnError


@dataclass(frozen=True)
class Layout:
    """How a node's value maps to the TransformerLens layout of its site.

    kind: "same" | "bhsd" ([b, h, s, d] <-> [b, s, h, d]) | "flat" ([b, s, h*d]
    <-> [b, s, h, d]) | "scores" (additive mask -> -inf, like TransformerLens) |
    "batch" ([1, s, d] broadcast over the batch, for position embeddings) |
    "tokens" ([b*s, d] <-> [b, s, d], where a model flattens batch and pos) |
    "squeeze3" ([b, s, h, 1, d] <-> [b, s, h, d], Falcon's grouped k/v).
    """

    kind: str = "same"
    needs_batch = property(lambda self: self.kind in ("batch", "tokens"))
    heads: int = 0
    d_head: int = 0
    # > 1 when the node holds each kv head `group` times over (k repeated to all
    # query heads before rotary, Falcon); hooks see the kv heads once
    group: int = 1

    def to_tl(self, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        y = self._to_tl(x, batch)
        if self.group > 1:  # [b, s, kv*group, d] -> [b, s, kv, d]: the copies are equal
            y = y.unflatten(2, (-1, self.group))[:, :, :, 0]
        return y

    def from_tl(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
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
        if self.kind == "scores":
            # HF adds the dtype's minimum at masked positions; TransformerLens shows -inf
            return x.masked_fill(x <= torch.finfo(x.dtype).min / 2, float("-inf"))
        if self.kind == "tokens":
            return x.unflatten(0, (batch, -1))
        if self.kind == "batch" and batch is not None and x.shape[0] != batch:
            return x.expand(batch, *x.shape[1:])
        return x

    def _from_tl(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.kind == "bhsd":
            return y.transpose(1, 2)
        if self.kind == "flat":
            return y.flatten(-2)
        if self.kind == "tokens":
            return y.flatten(0, 1)
        if self.kind == "squeeze3":
            return y.unsqueeze(3)
        return y


class HookPoint(nn.Module):
    """A named site. `fn(activation, hook) -> tensor | None`; `hook.name` is the site's name."""

    def __init__(self, name: str, layout: Layout = Layout()):
        super().__init__()
        self.name = name
        self.layout = layout
        self.fwd_hooks: list = []   # [(fn, permanent)]

    def layer(self) -> int | None:
        parts = self.name.split(".")
        return int(parts[1]) if parts[0] == "blocks" else None

    def forward(self, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        if not self.fwd_hooks:
            return x
        y = self.layout.to_tl(x, batch)
        for fn, _ in list(self.fwd_hooks):
            out = fn(y, hook=self)
            if out is None:
                continue
            if not isinstance(out, torch.Tensor):
                raise HookReturnError(
                    f"hook on {self.name} returned {type(out).__name__}; return a tensor "
                    f"shaped {tuple(y.shape)} or None")
            if out.shape != y.shape or out.dtype != y.dtype:
                raise HookReturnError(
                    f"hook on {self.name} returned {tuple(out.shape)} {out.dtype}; the activation "
                    f"is {tuple(y.shape)} {y.dtype}, and a replacement must match it")
            y = out
        return self.layout.from_tl(y, x)

    def extra_repr(self) -> str:
        return f"{self.name!r}, layout={self.layout.kind}"
