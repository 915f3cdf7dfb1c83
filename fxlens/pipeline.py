"""The compiler pipeline: a visible tuple of passes run by one loop.

After each pass the loop lints the graph and calls `on_pass(name, gm, result)`
(where per-pass dumps come from). Weight processing passes join the tuple when
asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from fxlens.analysis import ModelSpec, analyse
from fxlens.passes_base import PassResult
from fxlens.passes import expose_norms, insert_hooks


@dataclass
class Context:
    embed_path: str | None
    unembed_path: str | None
    spec: ModelSpec | None = None
    results: list = field(default_factory=list)


def discover_sites(gm: fx.GraphModule, ctx: Context) -> PassResult:
    """Annotate `node.meta["fxlens.sites"]`; the spec goes on the context."""
    ctx.spec = analyse(gm, ctx.embed_path, ctx.unembed_path)
    return PassResult("discover_sites", matched=len(ctx.spec.sites),
                      details={"blocks": ctx.spec.n_layers})


PIPELINE = (
    ("expose_norms", lambda gm, ctx: expose_norms(gm)),
    ("discover_sites", discover_sites),
    ("insert_hooks", lambda gm, ctx: insert_hooks(gm)),
)


def run_pipeline(gm: fx.GraphModule, ctx: Context, pipeline=PIPELINE, on_pass=None) -> fx.GraphModule:
    for name, fn in pipeline:
        result = fn(gm, ctx)
        gm.graph.lint()
        ctx.results.append(result)
        if on_pass is not None:
            on_pass(name, gm, result)
    return gm
