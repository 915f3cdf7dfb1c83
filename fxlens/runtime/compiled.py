"""Compiled hooked inference: the instrumented graph, specialised to the sites in
use, compiled with `torch.compile` -- compiled once per hooked-site set, never
per hook function.

A variant is built from a copy of the model's graph for one request, by the
VARIANT pipeline (fxlens/pipeline.py):
  mark_boundaries  (segmented variants) each block's residual input marked
                   where segments will be cut
  specialise       unobserved HookPoints removed, cached sites become extra
                   graph outputs (in TransformerLens layout), hooked sites keep
                   their HookPoint
  fuse_attention   every attention nobody observes becomes one
                   scaled_dot_product_attention node
  segment          (segmented variants) the graph cut into compiled segments
Variants are kept by key (graph version, frozenset(cached names), hooked
names), so switching between hook sets never rebuilds one, and a
`run_with_cache` filter is resolved to names first: a new predicate selecting
the same names is the same variant.

Two ways to run the hooks (`HookedModel.compile(hooks=...)`):

  "python" (default)  a variant with hooked sites is cut into segments
      (`passes/segment.py`) at block boundaries and at the hooked sites; each
      segment is compiled, and the hooks run as ordinary Python between
      compiled segments, exactly as in the eager model. A new hook function --
      a `functools.partial`, a lambda in a loop, a closure over a position, a
      hook that prints or calls `.item()` -- compiles nothing: dynamo never
      sees it. Compiled segments are shared by key (`Segment.key`, the
      segment's code) across blocks and across variants, so blocks with equal
      code compile once, and a new set of hooked sites only adds cuts:
      segments whose code is unchanged are reused. Segment inputs go in
      contiguous, so a hook returning another memory layout does not
      recompile (dynamo guards on strides). A hook's cost is one Python call
      and its layout mapping (eager ops). A variant with no hooked site (a
      forward, `run_with_cache`) has no hook to guard on: it compiles as one
      whole graph (one compile; nothing between blocks).
  "traced"  the whole variant is one compiled graph and dynamo traces the
      user's hooks into it: a hook's ops fuse with the model's and no segment
      boundaries cost Python calls, which can matter for a fixed hook set on
      small inputs. But dynamo guards on the hook functions: every new function
      object (a new partial or closure) compiles the variant again, until
      dynamo's recompile limit sends the site to eager. A hook dynamo cannot
      trace (a graph break) makes the call run eagerly, with one warning.

Generation's prefill and decode graphs (`fxlens.runtime.kv_cache`) are cut the
same way (`kv_variant`: pipeline.KV_VARIANT), whether or not a site is hooked:
a whole-model graph per step kind costs inductor minutes on a 30-layer model,
one shared block segment seconds. Their segments join the runner's shared ones.

Segments and traced variants compile with `dynamic=True`: a new batch size or
sequence length reuses the compiled code. Size-1 dimensions are specialised by
dynamo, so the first call with batch 1 (or a 1-token sequence) compiles once
more, after which both keep working. Segment inputs have their static sizes
(d_model, heads, ...; read from the segment's `meta["val"]`) marked static, so
that a sequence length equal to a static size by chance is not unified with it
(dynamo's duck sizing) and does not recompile at the next length.
"""

from __future__ import annotations

import logging
import operator
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxlens.frontend.decoder import has_mask_input
from fxlens.discovery.names import canonical_order
from fxlens.passes.segment import Segment
from fxlens.runtime.prefix import KeptBudget, PrefixReuse
from fxlens.pipeline import KV_ADVICE, KV_VARIANT, VARIANT_ADVICE, Context, run_pipeline, variant_pipeline

# Compiled and eager results agree to ~1e-6 of each tensor's size in float32
# (inductor reorders reductions and fuses the softmax; sdpa normalises
# blockwise); tests compare at this relative tolerance, as the oracle tests do.
COMPILED_RTOL = 1e-4

# one INFO line as a graph starts compiling (which variant, how big) and one when done (seconds)
log = logging.getLogger("fxlens.compile")


class CompileFallbackWarning(UserWarning):
    """A hook set ran eagerly because torch.compile could not trace it."""


def copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict]:
    """A new GraphModule over a copy of `gm`'s graph, sharing its parameters,
    buffers and HookPoint modules. Returns it and the old -> new node map."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, val_map)   # node meta is copied along
    graph.output(out)
    return fx.GraphModule(gm, graph, class_name="FxlensVariant"), val_map


def build_variant(model, cached, hooked, fuse_attention: bool = True, segmented: bool = False):
    """The specialised GraphModule for one request (not compiled: callers may
    run it eagerly, as tests do): pipeline.VARIANT on a copy of the model's
    graph. With `segmented`, the graph is cut into `Segment`s at block
    boundaries and hooked sites (`passes/segment.py`). Returns (gm, pass results)."""
    gm, _ = copy_graph_module(model.graph_module)
    ctx = Context(spec=model.spec, cached=tuple(cached), hooked=frozenset(hooked))
    gm = run_pipeline(gm, ctx, variant_pipeline(fuse_attention, segmented), advice=VARIANT_ADVICE)
    return gm, ctx.results


HOOK_MODES = ("python", "traced")

# inductor's options on CPU (a user's options= override them). A value with several
# readers is materialised once when its pointwise body has more than this many ops;
# inductor's CPU default (50) inlines the attention mask (arange, compares, padding
# and, where: ~20 ops) into every layer's softmax kernel wherever the pattern is
# kept explicit (run_with_cache, hooked attention), so each layer recomputed it:
# tiny GPT-2 run_with_cache 3.9 -> 2.7 ms at 2 threads (benchmarks/bench.py).
# Single-reader chains (an MLP's activation) are not affected.
CPU_PATCHES = {"realize_opcount_threshold": 8}


@dataclass
class Variant:
    key: tuple
    cached: tuple[str, ...]          # output order after the logits
    hooked: tuple[str, ...]
    gm: fx.GraphModule
    results: list
    fn: object = None                # the torch.compile'd graph, or the segmented gm
    compilations: int = 0            # traced: graphs compiled for this variant (first + recompiles)
    eager: dict = field(default_factory=dict)   # traced: hook-function ids -> why they run eagerly
    segmented: bool = False          # hooks run in Python between compiled segments
    segments: tuple = ()             # segmented: the CompiledSegments this variant calls
    takes_mask: bool = False         # the graph has an attention-mask input
    prefix: object = None            # segmented: its PrefixReuse (fxlens.runtime.prefix), if any

    @property
    def fused(self) -> int:
        return next((r.matched for r in self.results if r.name == "fuse_attention"), 0)


class CompiledSegment:
    """One compiled segment, shared by every `Segment` with its key (blocks with
    equal code, and the same piece in other variants). Pure: a function of its
    inputs (activations, the block's weights, sizes), so when dynamo cannot
    compile it, the same call runs the graph eagerly (one warning)."""

    def __init__(self, runner: "CompiledRunner", gm: fx.GraphModule, key: str, label: str | None = None):
        self.runner, self.gm, self.key = runner, gm, key
        self.label = label or f"segment {len(runner.segments)}"
        self.compilations = 0
        self.eager_reason: str | None = None
        # per input: its static dimensions where some others are symbolic (batch, pos)
        self.static_dims = []
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                v = n.meta.get("val")
                dims = None
                if isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape):
                    dims = [i for i, d in enumerate(v.shape) if not isinstance(d, torch.SymInt)] or None
                self.static_dims.append(dims)
        self.fn = torch.compile(gm, backend=runner._counting_backend(self), dynamic=runner.dynamic,
                                fullgraph=True)

    def __call__(self, *args):
        if self.eager_reason is not None:
            return self.gm(*args)
        args = [_as_guarded(a, dims) for a, dims in zip(args, self.static_dims)]
        try:
            return self.fn(*args)
        except Exception as exc:  # dynamo/inductor could not compile it: run the same call eagerly
            out = self.gm(*args)   # a real error raises here
            self.eager_reason = _why(exc)
            self.runner.fallbacks += 1
            warnings.warn(f"fxlens: torch.compile cannot compile a graph segment: {self.eager_reason}; "
                          f"it runs eagerly", CompileFallbackWarning, stacklevel=_user_stacklevel())
            return out


def _as_guarded(a, static_dims):
    """A segment input as its compiled code expects it: dynamo guards on strides, and
    a hook may return another memory layout than the graph made (`index_fill` on a
    transposed view returns a contiguous tensor, which maps back transposed), so
    activations go in contiguous -- one layout, one compile -- with their static
    sizes marked static (see the module docstring)."""
    if type(a) is not torch.Tensor:      # parameters (static already), sizes, None
        return a
    if not a.is_contiguous():
        a = a.contiguous()
    if static_dims is not None:
        torch._dynamo.mark_static(a, static_dims)
    return a


class CompiledRunner:
    """Owns the compiled variants of one HookedModel (see the module docstring)."""

    def __init__(self, model, *, backend="inductor", mode: str | None = None,
                 options: dict | None = None, dynamic: bool = True, fullgraph: bool = True,
                 fuse_attention: bool = True, hooks: str = "python", reuse_prefix: bool = False):
        if hooks not in HOOK_MODES:
            raise ValueError(f"hooks={hooks!r}: use 'python' (hooks run between compiled segments; "
                             f"new hook functions never recompile) or 'traced' (hooks compiled into "
                             f"the graph; each new hook function recompiles)")
        self.model = model
        self.backend = backend
        self.mode = mode
        self.options = dict(options or {})
        self.dynamic = dynamic
        self.fullgraph = fullgraph
        self.fuse_attention = fuse_attention
        self.hooks = hooks
        self.reuse_prefix = reuse_prefix
        self.kept_budget = KeptBudget()      # the bytes kept prefixes may hold (fxlens.runtime.prefix)
        self.variants: dict[tuple, Variant] = {}
        self.segments: dict[str, CompiledSegment] = {}   # Segment.key -> its compiled code
        self.graph_version = self._version()
        self.compilations = 0
        self.compile_seconds = 0.0
        self.fallbacks = 0

    # --- variants ---------------------------------------------------------------
    def _version(self) -> tuple:
        m = self.model
        return (m._graph_version, id(m.graph_module))

    def key(self, cached, hooked) -> tuple:
        return (*self._version(), frozenset(cached), tuple(hooked))

    def clear(self) -> None:
        """Drop every variant and compiled segment (the graph or its buffers changed)."""
        self.variants.clear()
        self.segments.clear()

    def variant(self, cached, hooked) -> Variant:
        if self._version() != self.graph_version:
            # the graph was rewritten (an opt-in site) or replaced: old variants are stale
            self.clear()
            self.graph_version = self._version()
        key = self.key(cached, hooked)
        v = self.variants.get(key)
        if v is None:
            ordered = tuple(canonical_order(set(cached)))
            # hooks="python": a variant with hooked sites runs in segments with its hooks
            # between them; one without hooks (forward, run_with_cache) has no hook to
            # guard on and compiles whole (one compile, no Python between blocks)
            segmented = self.hooks == "python" and bool(hooked)
            gm, results = build_variant(self.model, ordered, hooked, self.fuse_attention,
                                        segmented=segmented)
            v = Variant(key=key, cached=ordered, hooked=tuple(hooked), gm=gm, results=results,
                        segmented=segmented, takes_mask=has_mask_input(gm))
            if segmented:
                v.segments = tuple(self._use_compiled_segments(gm))
                v.prefix = PrefixReuse.build(gm, self.kept_budget) if self.reuse_prefix else None
                v.fn = v.prefix or gm
            else:
                v.fn = torch.compile(gm, backend=self._counting_backend(v), dynamic=self.dynamic,
                                     fullgraph=self.fullgraph)
            self.variants[key] = v
        return v

    def kv_variant(self, gm: fx.GraphModule, hooked, label: str) -> fx.GraphModule:
        """A KV-cache graph (generation's prefill or decode graph, `fxlens.runtime.kv_cache`)
        specialised to the `hooked` sites and cut into segments at block boundaries
        (pipeline.KV_VARIANT), each segment compiled and shared by key: the blocks of a
        model compile once, not once per layer inside one whole-model graph (SmolLM2's
        30 layers took 101 s to compile as two whole graphs). Hooks run in Python
        between the segments, as in segmented variants; a new hook function compiles
        nothing. Unobserved attentions fuse into sdpa unless the runner's fuse_attention
        is off. Segments are logged as `label` segments."""
        copy, _ = copy_graph_module(gm)
        ctx = Context(spec=self.model.spec, hooked=frozenset(hooked))
        out = run_pipeline(copy, ctx, variant_pipeline(self.fuse_attention, True, KV_VARIANT), advice=KV_ADVICE)
        self._use_compiled_segments(out, label)
        return out

    def _use_compiled_segments(self, gm: fx.GraphModule, label: str | None = None) -> list[CompiledSegment]:
        """Point each Segment of a segmented variant at the compiled code for its key."""
        for n in gm.graph.nodes:     # weights and buffers: static sizes (parameters are already)
            if n.op == "get_attr":
                t = operator.attrgetter(n.target)(gm)
                if type(t) is torch.Tensor:
                    torch._dynamo.mark_static(t)
        used = []
        for seg in gm.modules():
            if isinstance(seg, Segment):
                compiled = self.segments.get(seg.key)
                if compiled is None:
                    compiled = self.segments[seg.key] = CompiledSegment(
                        self, seg.graph_module, seg.key,
                        label and f"{label} segment {len(used)}")
                seg.use(compiled)
                if compiled not in used:
                    used.append(compiled)
        return used

    def _counting_backend(self, counter):
        """The chosen backend, counting each graph it compiles (tests count these)
        on `counter` (a Variant or a CompiledSegment) and on the runner."""
        inner = self._inner_backend()
        label = f"variant {_label(counter)}" if isinstance(counter, Variant) else counter.label

        def backend(gm, example_inputs):
            counter.compilations += 1
            return self._timed(inner, label)(gm, example_inputs)

        return backend

    def _timed(self, inner, label: str):
        """`inner` (a backend), counted in `compilations`, saying on the `fxlens.compile`
        logger what it compiles and how long that took."""
        def backend(gm, example_inputs):
            self.compilations += 1
            log.info("fxlens: compiling %s of %s (%d graph nodes; backend %s)", label,
                     self.model.cfg.model_name or "the model", len(gm.graph.nodes), self.backend)
            start = time.perf_counter()
            out = inner(gm, example_inputs)
            log.info("fxlens: compiled %s in %.1f s", label, time.perf_counter() - start)
            return out
        return backend

    def _inner_backend(self):
        if callable(self.backend):
            return self.backend
        if self.backend != "inductor":
            if self.mode or self.options:
                raise ValueError("mode= and options= apply to the inductor backend only")
            return torch._dynamo.lookup_backend(self.backend)
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        cpu = next(self.model.graph_module.parameters(), torch.empty(0)).device.type == "cpu"
        patches = {**(CPU_PATCHES if cpu else {}),
                   **(list_mode_options(self.mode, self.dynamic) if self.mode else {}), **self.options}

        def inductor(gm, example_inputs):
            return compile_fx(gm, example_inputs, config_patches=patches or None)

        return inductor

    # --- running ------------------------------------------------------------------
    def run(self, tokens: torch.Tensor, cache_names=(), mask: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, dict]:
        """`mask`: the attention mask input of the graph (None: no padding). The
        compiled graph is always given one (all ones for None): padded and
        unpadded calls share one compiled graph."""
        model = self.model
        # sites with hooks (a backward hook is registered by its HookPoint as it runs: it cuts
        # the graph too) or an SAE (fxlens.interp.saes)
        hooked = model._hooked_sites()
        v = self.variant(cache_names, hooked)
        before = self.compilations
        start = time.perf_counter()
        # the graph always gets a mask (all ones for None): padded and unpadded calls share it
        args = (tokens, torch.ones_like(tokens) if mask is None else mask) if v.takes_mask else (tokens,)
        if v.segmented:
            outs = v.fn(*args)     # hooks run in Python between the compiled segments
        else:
            fns = self._hook_ids(hooked)
            if fns in v.eager:
                return model._run_eager(tokens, cache_names, mask)
            try:
                outs = v.fn(*args)
            except Exception as exc:  # dynamo could not trace it: run the same call eagerly
                logits, store = model._run_eager(tokens, cache_names, mask)   # a real error raises here
                self._fall_back(v, fns, hooked, exc)
                return logits, store
        if self.compilations != before:
            self.compile_seconds += time.perf_counter() - start
        logits, *values = outs
        return logits, dict(zip(v.cached, values))

    def _hook_ids(self, hooked) -> tuple:
        hd = self.model.hook_dict
        return tuple((n, tuple(id(fn) for fn, _ in hd[n].fwd_hooks)) for n in hooked)

    def _fall_back(self, v: Variant, fns: tuple, hooked, exc: Exception) -> None:
        hd = self.model.hook_dict
        hooks = [f"{_fn_name(fn)} on {n}" for n in hooked for fn, _ in hd[n].fwd_hooks]
        what = "hooks " + ", ".join(hooks[:3]) + (" ..." if len(hooks) > 3 else "") if hooks \
            else "the plain graph"
        reason = _why(exc)
        v.eager[fns] = reason
        self.fallbacks += 1
        warnings.warn(f"fxlens: torch.compile cannot trace {what}: {reason}; this hook set runs "
                      f"eagerly", CompileFallbackWarning, stacklevel=_user_stacklevel())

    def stats(self) -> dict:
        """variants built; graphs compiled (segments or traced variants, first
        compiles and recompiles); seconds of calls that compiled; eager fallbacks;
        compiled segments (hooks='python'); fused attentions per variant."""
        out = {"hooks": self.hooks, "variants": len(self.variants), "compilations": self.compilations,
               "compile_seconds": round(self.compile_seconds, 2), "fallbacks": self.fallbacks}
        if self.hooks == "python":
            out["segments"] = len(self.segments)
            reuse = [v.prefix for v in self.variants.values() if v.prefix is not None]
            out["prefix_reused"] = sum(p.hits for p in reuse)
            out["prefix_run"] = sum(p.misses for p in reuse)
        out["fused_attention"] = {_label(v): v.fused for v in self.variants.values()}
        return out


def _label(v: Variant) -> str:
    parts = []
    if v.cached:
        parts.append(f"cache {len(v.cached)}")
    if v.hooked:
        parts.append(f"hooks {','.join(v.hooked)}")
    return "; ".join(parts) or "plain"


def _fn_name(fn) -> str:
    fn = getattr(fn, "func", fn)   # functools.partial
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _why(exc: Exception) -> str:
    """One line from a dynamo error (they run to pages): what it could not do,
    its explanation, and the user's line that did it."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    head = lines[0] if lines else type(exc).__name__
    expl = next((ln[len("Explanation:"):].strip() for ln in lines if ln.startswith("Explanation:")), "")
    where = ""
    for i, ln in enumerate(lines):
        if ln.startswith('File "'):   # the innermost user frame comes last
            path, _, rest = ln[len('File "'):].partition('"')
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File") else ""
            where = f" at {path.rsplit('/', 1)[-1]}{rest.replace(', line ', ':').split(',')[0]}" + \
                (f" `{code}`" if code and not code.startswith("^") else "")
    msg = f"{type(exc).__name__}: {head}" + (f" ({expl})" if expl else "") + where
    return msg if len(msg) <= 400 else msg[:397] + "..."


def _user_stacklevel() -> int:
    """Stack level of the first frame outside fxlens and torch (the user's call)."""
    skip = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(torch.__file__))   # fxlens/, torch/
    frame, level = sys._getframe(1), 1     # level 1: the caller, who warns
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level
