"""Compiled hooked inference: the instrumented graph, specialised to the hooks in
use, compiled with `torch.compile` -- one compiled variant per hook set.

A variant is built from a copy of the model's graph for one request:
  specialise       unobserved HookPoints removed, cached sites become extra
                   graph outputs (in TransformerLens layout), hooked sites keep
                   their HookPoint so dynamo traces the user's hooks into the graph
  fuse_attention   every attention nobody observes becomes one
                   scaled_dot_product_attention node
and compiled with `torch.compile(dynamic=True, fullgraph=True)`: a new batch
size or sequence length reuses the compiled code. Size-1 dimensions are
specialised by dynamo, so the first call with batch 1 (or a 1-token sequence)
compiles once more, after which both keep working.

Variants are kept by key (graph version, frozenset(cached names), hooked names),
so switching between hook sets never recompiles. Inside a variant dynamo guards
on the hook functions themselves: a different function object on the same site
compiles once (and the previous one stays cached). A hook dynamo cannot trace
(a graph break: printing, `.item()`, data-dependent Python control flow ...)
makes the call run eagerly instead, with one warning saying why; the same hook
functions then go straight to the eager path.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .names import canonical_order

# Compiled and eager results agree to ~1e-6 of each tensor's size in float32
# (inductor reorders reductions and fuses the softmax; sdpa normalises
# blockwise); tests compare at this relative tolerance, as the oracle tests do.
COMPILED_RTOL = 1e-4


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


def _z_nodes(model, val_map: dict) -> tuple[list[fx.Node], list[str]]:
    """Each block's pattern@V node in the copy (BlockSpec.z, or hook_z's input)."""
    by_site = {n.meta["fxlens.site"]: n for n in model.graph_module.graph.nodes
               if n.op == "call_module" and "fxlens.site" in n.meta}
    nodes, labels = [], []
    for b in model.spec.blocks:
        z = b.z if b.z in val_map else None
        hook = by_site.get(f"blocks.{b.layer}.attn.hook_z")
        if z is None and hook is not None:
            z = hook.args[0]
        if z is not None and z in val_map:
            nodes.append(val_map[z])
            labels.append(f"blocks.{b.layer}")
    return nodes, labels


def _mark_boundaries(model, val_map: dict) -> int:
    """meta["fxlens.boundary"] on the copy's residual value entering each block
    (and leaving the last one): segments end there, so blocks compile alike."""
    from fxlens.passes.segment import BOUNDARY

    names = [f"blocks.{b.layer}.hook_resid_pre" for b in model.spec.blocks]
    if model.spec.blocks:
        names.append(f"blocks.{model.spec.blocks[-1].layer}.hook_resid_post")
    by_site = {n.meta["fxlens.site"]: n for n in model.graph_module.graph.nodes
               if n.op == "call_module" and "fxlens.site" in n.meta}
    marked = 0
    for name in names:
        node = by_site.get(name)
        while node is not None and node.op == "call_module" and "fxlens.site" in node.meta:
            node = node.args[0]       # chained hooks (resid_post L-1, resid_pre L) on one value
        if isinstance(node, fx.Node) and node in val_map and node.op != "placeholder":
            val_map[node].meta[BOUNDARY] = True
            marked += 1
    return marked


def build_variant(model, cached, hooked, fuse_attention: bool = True, segmented: bool = False):
    """The specialised GraphModule for one request (not compiled: callers may
    run it eagerly, as tests do). With `segmented`, the graph is cut into
    `Segment`s at block boundaries and hooked sites (`passes/segment.py`).
    Returns (gm, pass results)."""
    from fxlens.passes.fuse_attention import fuse_attention as fuse
    from fxlens.passes.segment import segment
    from fxlens.passes.specialise import specialise

    gm, val_map = copy_graph_module(model.graph_module)
    z_nodes, labels = _z_nodes(model, val_map)
    if segmented:
        _mark_boundaries(model, val_map)
    results = [specialise(gm, list(cached), set(hooked))]
    if fuse_attention:
        live = set(gm.graph.nodes)
        pairs = [(z, lab) for z, lab in zip(z_nodes, labels) if z in live]
        results.append(fuse(gm, [z for z, _ in pairs], [lab for _, lab in pairs]))
    if segmented:
        gm, result = segment(gm)
        results.append(result)
    return gm, results


@dataclass
class Variant:
    key: tuple
    cached: tuple[str, ...]          # output order after the logits
    hooked: tuple[str, ...]
    gm: fx.GraphModule
    results: list
    fn: object = None                # the torch.compile'd callable
    compilations: int = 0            # graphs compiled for this variant (first + recompiles)
    eager: dict = field(default_factory=dict)   # hook-function ids -> why they run eagerly

    @property
    def fused(self) -> int:
        return next((r.matched for r in self.results if r.name == "fuse_attention"), 0)


class CompiledRunner:
    """Owns the compiled variants of one HookedModel (see the module docstring)."""

    def __init__(self, model, *, backend="inductor", mode: str | None = None,
                 options: dict | None = None, dynamic: bool = True, fullgraph: bool = True,
                 fuse_attention: bool = True):
        self.model = model
        self.backend = backend
        self.mode = mode
        self.options = dict(options or {})
        self.dynamic = dynamic
        self.fullgraph = fullgraph
        self.fuse_attention = fuse_attention
        self.variants: dict[tuple, Variant] = {}
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

    def variant(self, cached, hooked) -> Variant:
        if self._version() != self.graph_version:
            # the graph was rewritten (an opt-in site) or replaced: old variants are stale
            self.variants.clear()
            self.graph_version = self._version()
        key = self.key(cached, hooked)
        v = self.variants.get(key)
        if v is None:
            ordered = tuple(canonical_order(set(cached)))
            gm, results = build_variant(self.model, ordered, hooked, self.fuse_attention)
            v = Variant(key=key, cached=ordered, hooked=tuple(hooked), gm=gm, results=results)
            v.fn = torch.compile(gm, backend=self._counting_backend(v), dynamic=self.dynamic,
                                 fullgraph=self.fullgraph)
            self.variants[key] = v
        return v

    def _counting_backend(self, variant: Variant):
        """The chosen backend, counting each graph it compiles (tests count these)."""
        inner = self._inner_backend()

        def backend(gm, example_inputs):
            variant.compilations += 1
            self.compilations += 1
            return inner(gm, example_inputs)

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

        patches = {**(list_mode_options(self.mode, self.dynamic) if self.mode else {}), **self.options}

        def inductor(gm, example_inputs):
            return compile_fx(gm, example_inputs, config_patches=patches or None)

        return inductor

    # --- running ------------------------------------------------------------------
    def run(self, tokens: torch.Tensor, cache_names=()) -> tuple[torch.Tensor, dict]:
        model = self.model
        hooked = tuple(n for n, hp in model.hook_dict.items() if hp.fwd_hooks)
        v = self.variant(cache_names, hooked)
        fns = self._hook_ids(hooked)
        if fns in v.eager:
            return model._run_eager(tokens, cache_names)
        before = self.compilations
        start = time.perf_counter()
        try:
            outs = v.fn(tokens)
        except Exception as exc:  # dynamo could not trace it: run the same call eagerly
            logits, store = model._run_eager(tokens, cache_names)   # a real error raises here
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
        return {"variants": len(self.variants), "compilations": self.compilations,
                "compile_seconds": round(self.compile_seconds, 2), "fallbacks": self.fallbacks,
                "fused_attention": {_label(v): v.fused for v in self.variants.values()}}


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
    skip = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1     # level 1: the caller, who warns
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level
