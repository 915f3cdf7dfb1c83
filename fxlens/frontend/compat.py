"""Version workarounds, each with its reason. Nothing else in fxlens branches on versions."""

from __future__ import annotations

import torch
import torch.fx as fx


def mutates(node: fx.Node) -> bool:
    """Whether `node` is an ATen op that writes to one of its inputs (`add_`,
    `index_put_`, `copy_`). An OpOverload shows its schema only as `_schema`
    (torch 2.9 to 2.13 have no public accessor); `is_mutable` is what torch's
    own functionalisation reads."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
        and node.target._schema.is_mutable


def export_dims(n_ctx: int):
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=max(2, n_ctx))
    return batch, seq
