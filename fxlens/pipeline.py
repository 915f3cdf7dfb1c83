"""The compiler pipeline: visible tuples of passes run by one loop.

    FRONT       split_shared_norms, expose_norms, relative_bias, discover_sites
    PROCESSING  fold_ln, center_writing_weights, center_unembed, fold_value_biases
                (each only when its flag is on; TransformerLens's order)
    BACK        insert_hooks
    ENCODER     expose_norms, discover_sites (the encoder's), insert_hooks
    VARIANT     mark_boundaries, specialise, fuse_attention, segment
                (a compiled variant, on a copy of the instrumented graph:
                fxlens/runtime/compiled.py; `variant_pipeline` leaves out
                fuse_attention when it is off, and the boundaries and segments
                when hooks do not run between compiled segments)
    KV_PREFILL  kv_prefill   (on a copy of an instrumented graph: generation's
    KV_DECODE   kv_decode     prompt pass, and its one-token steps)
    KV_VARIANT  mark_boundaries, specialise, fuse_attention, segment   (compiled
                generation: a copy of the prefill or decode graph, cut into segments)

`reprocess` runs PROCESSING passes on an already instrumented graph
(HookedModel.process_weights_): remove_hooks, the passes, insert_hooks.

After each pass the loop lints the graph, records its PassResult and calls
`on_pass(name, gm, result)` (where per-pass dumps come from). A pass returns
its PassResult, or (new GraphModule, PassResult) when it builds a new module
(segment).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from fxlens.discovery.decoder import ModelSpec, analyse
from fxlens.discovery.encoder import discover_encoder_sites
from fxlens.errors import FxlensError, PassError
from fxlens.frontend.decoder import MASK_INPUT, POSITIONS
from fxlens.ir.params import ProcessingLog
from fxlens.passes import (center_unembed, center_writing_weights, expose_norms, fold_ln,
                           fold_value_biases, insert_hooks, kv_decode, kv_prefill, refactor_factored_attn_matrices,
                           relative_bias, remove_hooks, split_shared_norms)
from fxlens.ir.pass_result import PassResult
from fxlens.discovery.columns import column_maps
from fxlens.passes.fuse_attention import fuse_attention
from fxlens.passes.segment import mark_boundaries, segment
from fxlens.passes.specialise import specialise

# what a pass that fails unexpectedly advises, by pipeline
PROCESSING_ADVICE = "turn the processing flag off (or use from_pretrained_no_processing) and please report the model"
VARIANT_ADVICE = "compile with fuse_attention=False (or run the model uncompiled) and please report the model"
KV_ADVICE = "generate recomputes the prefix instead (as use_past_kv_cache=False); please report the model"


@dataclass
class Context:
    embed_path: str | None = None
    unembed_path: str | None = None
    flags: dict = field(default_factory=dict)
    spec: ModelSpec | None = None
    cached: tuple = ()              # VARIANT: the sites cached (extra outputs, in this order)
    hooked: frozenset = frozenset()  # VARIANT: the sites whose HookPoints stay
    log: ProcessingLog = field(default_factory=ProcessingLog)
    results: list = field(default_factory=list)
    fold_ln_center: bool = True     # fold_ln centres LayerNorm readers (TransformerLens's center_weights)

    def maps(self, gm):
        return column_maps(gm, self.spec)


def discover_sites(gm: fx.GraphModule, ctx: Context) -> PassResult:
    """Annotate `node.meta["fxlens.sites"]`; the spec goes on the context."""
    ctx.spec = analyse(gm, ctx.embed_path, ctx.unembed_path)
    return PassResult("discover_sites", matched=len(ctx.spec.sites),
                      details={"blocks": ctx.spec.n_layers})


FRONT = (
    ("split_shared_norms", lambda gm, ctx: split_shared_norms(gm)),
    ("expose_norms", lambda gm, ctx: expose_norms(gm)),
    ("relative_bias", lambda gm, ctx: relative_bias(gm)),
    ("discover_sites", discover_sites),
)
PROCESSING = (
    ("fold_ln", lambda gm, ctx: fold_ln(gm, ctx.spec, ctx.log, center=ctx.fold_ln_center)),
    ("center_writing_weights", lambda gm, ctx: center_writing_weights(gm, ctx.spec, ctx.log)),
    ("center_unembed", lambda gm, ctx: center_unembed(gm, ctx.spec, ctx.log)),
    ("fold_value_biases", lambda gm, ctx: fold_value_biases(gm, ctx.spec, ctx.log, ctx.maps(gm))),
    ("refactor_factored_attn_matrices",
     lambda gm, ctx: refactor_factored_attn_matrices(gm, ctx.spec, ctx.log, ctx.maps(gm))),
)
BACK = (
    ("insert_hooks", lambda gm, ctx: insert_hooks(gm)),
)
# encoders: post-LN blocks need no norm splitting, and are not processed (as TransformerLens's HookedEncoder)
ENCODER = (
    FRONT[1],
    ("discover_sites", discover_encoder_sites),
) + BACK

# generation with a KV cache (fxlens.runtime.kv_cache), each on its own copy of the instrumented graph
KV_PREFILL = (
    ("kv_prefill", lambda gm, ctx: kv_prefill(gm, ctx.spec.n_layers)),
)
KV_DECODE = (
    ("kv_decode", lambda gm, ctx: kv_decode(gm, ctx.spec.n_layers, MASK_INPUT, POSITIONS)),
)


# compiled variants (fxlens/runtime/compiled.py): the copy's residual boundaries are
# marked while its HookPoints are there to find them, specialise keeps only the
# observed sites, the unobserved attentions fuse, and the graph is cut into segments
VARIANT = (
    ("mark_boundaries", lambda gm, ctx: mark_boundaries(gm, [b.layer for b in ctx.spec.blocks])),
    ("specialise", lambda gm, ctx: specialise(gm, list(ctx.cached), set(ctx.hooked))),
    ("fuse_attention", lambda gm, ctx: fuse_attention(gm)),
    ("segment", lambda gm, ctx: segment(gm)),
)


# compiled generation (fxlens.runtime.kv_cache): a copy of the prefill or decode graph
# keeping the hooked sites only, its keys and values returned, cut into segments at the
# block boundaries, so that equal blocks compile once (not one whole-model graph each)
def _kv_specialise(gm, ctx):
    return specialise(gm, (), set(ctx.hooked), keep_outputs=True)


KV_VARIANT = tuple((name, _kv_specialise if name == "specialise" else fn) for name, fn in VARIANT)


def build_pipeline(flags: dict) -> tuple:
    return FRONT + tuple(p for p in PROCESSING if flags.get(p[0])) + BACK


def variant_pipeline(fuse: bool, segmented: bool, base: tuple = VARIANT) -> tuple:
    """`base` (VARIANT, or KV_VARIANT) without fuse_attention unless `fuse`, and without
    the boundaries and the cut unless `segmented` (hooks run in Python between
    compiled segments)."""
    off = set() if segmented else {"mark_boundaries", "segment"}
    if not fuse:
        off.add("fuse_attention")
    return tuple(p for p in base if p[0] not in off)


def run_pipeline(gm: fx.GraphModule, ctx: Context, pipeline=None, on_pass=None,
                 advice: str = PROCESSING_ADVICE) -> fx.GraphModule:
    """Run `pipeline` (default: the build pipeline for `ctx.flags`) on `gm`; returns the
    GraphModule the last pass left (the same one unless a pass built a new one)."""
    for name, fn in pipeline or build_pipeline(ctx.flags):
        try:
            result = fn(gm, ctx)
        except FxlensError:
            raise
        except Exception as exc:   # an unexpected failure inside a pass: say which pass
            raise PassError(name, f"failed with {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                            f"{advice}") from exc
        if isinstance(result, tuple):     # a pass that builds a new GraphModule (segment)
            gm, result = result
        gm.graph.lint()
        ctx.results.append(result)
        if name in ctx.flags:
            ctx.log.applied[name] = result.matched > 0 or not result.skipped
        if on_pass is not None:
            on_pass(name, gm, result)
    for flag in ctx.flags:
        ctx.log.applied.setdefault(flag, False)
    return gm


def reprocess(gm: fx.GraphModule, spec: ModelSpec, log: ProcessingLog, flags: dict,
              center_ln: bool = True) -> list:
    """Weight processing on a graph that already has its hooks: the hook nodes
    come out (their site annotations stay), the PROCESSING passes named in
    `flags` run in TransformerLens's order, and insert_hooks puts the same sites
    back (as new HookPoints: callers re-attach their own). Returns the results."""
    ctx = Context(None, None, flags=dict(flags), spec=spec, log=log, fold_ln_center=center_ln)
    strip = (("remove_hooks", lambda gm, ctx: remove_hooks(gm)),)
    run_pipeline(gm, ctx, strip + tuple(p for p in PROCESSING if flags.get(p[0])) + BACK)
    return ctx.results
