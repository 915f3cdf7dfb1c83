"""Index tracing: which output columns of a projection hold head h's q (or k, v).

A fused QKV projection is split by views, chunks and slices whose layout
differs per architecture (GPT-2 [q|k|v], GPT-NeoX per-head interleaved,
Falcon grouped). Instead of reading that from a table, run the graph once on a
one-token input with each traced projection's output replaced by its column
indices, and read where they land: the values at a site are then the source
columns of each (head, d_head) position.
"""

from __future__ import annotations

import torch
import torch.fx as fx


class _IndexInterpreter(fx.Interpreter):
    def __init__(self, gm, sources, sinks):
        super().__init__(gm)
        self.sources = set(sources)
        self.sinks = set(sinks)
        self.seen: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.sources and isinstance(out, torch.Tensor):
            # float32 holds integers exactly up to 2**24, far beyond any column count
            out = torch.arange(out.numel(), dtype=torch.float32, device=out.device).reshape(out.shape)
        if n in self.sinks and isinstance(out, torch.Tensor):
            self.seen[n] = out.detach().clone()
        return out


def trace_indices(gm: fx.GraphModule, sources, sinks) -> dict[fx.Node, torch.Tensor]:
    """Values reaching each sink when every source emits `arange` (batch 1, pos 1)."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=next(gm.parameters()).device)
    interp = _IndexInterpreter(gm, sources, sinks)
    with torch.no_grad():
        interp.run(ids)
    return {k: v.round().long() for k, v in interp.seen.items()}


class _Recorder(fx.Interpreter):
    def __init__(self, gm, node):
        super().__init__(gm)
        self.node, self.value = node, None

    def run_node(self, n):
        out = super().run_node(n)
        if n is self.node:
            self.value = out.detach().clone()
        return out


def values_at(gm: fx.GraphModule, node: fx.Node, n_pos: int) -> torch.Tensor:
    """The value of `node` for one sequence of `n_pos` tokens, batch dim dropped."""
    ids = torch.zeros(1, n_pos, dtype=torch.long, device=next(gm.parameters()).device)
    rec = _Recorder(gm, node)
    with torch.no_grad():
        rec.run(ids)
    return rec.value.reshape(n_pos, -1)
