"""HookedModel: the TransformerLens surface over an instrumented graph."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fxlens.interp.cache import ActivationCache
from fxlens.frontend.decoder import has_mask_input
from fxlens.errors import ContextLengthError, FxlensError, InputError, NotApplicableError, PaddingError, UnknownHookError
from fxlens.interp.analysis_helpers import AnalysisMixin, lm_cross_entropy_loss
from fxlens.runtime.generate import GenerateMixin
from fxlens.ir.hook_points import HookPoint
from fxlens.discovery.names import canonical_order, is_opt_in
from fxlens.interp.saes import SAEMixin
from fxlens.interp.tl_surface import TransformerLensMixin, slice_positions
from fxlens.interp.weights import WeightsMixin
from fxlens.discovery.encoder import INPUTS
from fxlens.passes import materialise_opt_in
from fxlens.runtime.build import DEFAULT_FLAGS, load
from fxlens.runtime.compiled import CompileFallbackWarning, CompiledRunner

NamesFilter = str | Sequence[str] | Callable[[str], bool] | None

# A padded row against its own run, float32: the same ops on the same values
# except reductions over a longer (masked) key axis and batched matmuls, ~1e-6
# of the logits; 1e-4 of the largest logit separates that from shifted positions
# or attended pads (which move logits by O(1)).
PADDING_RTOL = 1e-4
RIGHT_INSTEAD = ", or pad on the right (padding_side='right')"


class HookedModel(SAEMixin, TransformerLensMixin, AnalysisMixin, GenerateMixin, WeightsMixin, nn.Module):
    """An HF model captured as a graph with TransformerLens hook points.

    Built by `fxlens.from_pretrained_no_processing(...)`; see DESIGN.md for the
    contract. `hook_dict` maps every materialised hook name to its HookPoint.
    """

    def __init__(self, gm, spec, cfg, tokenizer=None, processing=None, pass_results=()):
        super().__init__()
        self.graph_module = gm
        self.spec = spec
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.processing = processing
        self.pass_results = list(pass_results)
        self._graph_version = 0     # bumped on every graph rewrite; keys compiled variants
        self._compiled = None       # a CompiledRunner once compile() is called
        self.capture_info = None    # how torch.export captured the model (fxlens.capture.CaptureInfo)
        self._graph_at = None       # (batch, seq) -> (graph, CaptureInfo): the per-length fallback
        self._length_graphs: dict = {}
        self._padding_probe: dict = {}   # (graph version, side) -> "" or why that padding is refused
        self._refresh_hook_dict()

    # --- hook bookkeeping ---------------------------------------------------------
    def _refresh_hook_dict(self) -> None:
        hooks = {m.name: m for m in self.graph_module.modules() if isinstance(m, HookPoint)}
        self.hook_dict: dict[str, HookPoint] = {k: hooks[k] for k in canonical_order(hooks)}

    @property
    def hook_names(self) -> list[str]:
        """Every default site, in TransformerLens's order (opt-in sites once materialised)."""
        return list(self.hook_dict)

    @property
    def mod_dict(self) -> dict[str, HookPoint]:
        return self.hook_dict

    def _hook_point(self, name: str) -> HookPoint:
        if name not in self.hook_dict:
            if isinstance(name, str) and is_opt_in(name):
                self._materialise(name)
            if name not in self.hook_dict:
                raise UnknownHookError(name, self.hook_names)
        return self.hook_dict[name]

    def _materialise(self, name: str) -> None:
        maps = self._maps()  # traced on the graph as built, before it is rewritten
        result = materialise_opt_in(self.graph_module, self.spec, name, maps)
        self.pass_results.append(result)
        self._graph_changed()

    def _resolve(self, name_or_filter) -> list[HookPoint]:
        if callable(name_or_filter):
            return [hp for n, hp in self.hook_dict.items() if name_or_filter(n)]
        if isinstance(name_or_filter, str):
            return [self._hook_point(name_or_filter)]
        raise TypeError(f"a hook is named by a string or a predicate on names, not "
                        f"{type(name_or_filter).__name__}")

    def add_hook(self, name, hook: Callable, dir: str = "fwd", is_permanent: bool = False,
                 prepend: bool = False) -> None:
        """`dir="fwd"`: `hook(activation, hook)`; `dir="bwd"`: `hook(grad, hook)` with the
        gradient of whatever is backpropagated with respect to the site's activation
        (TransformerLens layout); a returned tensor replaces it."""
        for hp in self._resolve(name):
            self.check_hooks_to_add(hp, hp.name, hook, dir=dir, is_permanent=is_permanent, prepend=prepend)
            hooks = _hook_list(hp, dir)
            entry = (hook, is_permanent)
            hooks.insert(0, entry) if prepend else hooks.append(entry)

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both",
                    including_permanent: bool = False, level: int | None = None) -> None:
        """TransformerLens's reset_hooks: removes the hooks (permanent ones too with
        `including_permanent`) and, with `clear_contexts`, each hook point's ctx."""
        if clear_contexts:
            self.clear_contexts()
        self.remove_all_hook_fns(direction, including_permanent, level=level)
        self.is_caching = False

    @contextlib.contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True, clear_contexts: bool = False):
        """`with model.hooks(fwd_hooks=[(name, fn)], bwd_hooks=[(name, fn)]):` -- hooks
        live for the block only (and, with `clear_contexts`, so does each hook.ctx)."""
        added: list[tuple[list, tuple]] = []
        try:
            for dir, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for name, fn in pairs:
                    for hp in self._resolve(name):
                        self.check_hooks_to_add(hp, hp.name, fn, dir=dir)
                        entry = (fn, False)
                        _hook_list(hp, dir).append(entry)
                        added.append((_hook_list(hp, dir), entry))
            yield self
        finally:
            if reset_hooks_end:
                for hooks, entry in added:
                    with contextlib.suppress(ValueError):
                        hooks.remove(entry)
                if clear_contexts:
                    self.clear_contexts()

    # --- compiling -----------------------------------------------------------------------
    def compile(self, *, mode: str | None = None, backend="inductor", options: dict | None = None,
                dynamic: bool = True, fuse_attention: bool = True, hooks: str = "python",
                reuse_prefix: bool = False) -> "HookedModel":
        """Run through `torch.compile` from now on (see `fxlens.runtime.compiled`).

        Each set of observed sites gets its own specialised graph: `run_with_cache`
        names become extra graph outputs, sites nobody observes vanish, and
        attention nobody observes runs as fused `scaled_dot_product_attention`.
        `hooks="python"` (default): the graph is compiled in segments cut at
        block boundaries and hooked sites, and hooks run as plain Python between
        them, so a new hook function (a partial, a lambda, a closure over a
        position) never recompiles; blocks with equal code share one compiled
        segment. `hooks="traced"`: hooks are compiled into one whole graph (each
        new hook function recompiles; for a fixed hook set). Compilation is lazy
        (the first call with a new site set takes seconds); new batch sizes and
        sequence lengths reuse it (batch 1 or a 1-token input compiles once more).
        `reuse_prefix=True` (hooks="python"; opt-in): the work before the first
        hooked site is not redone while the inputs and weights equal the last
        call's (a sweep over positions at one layer). Weight edits must then go
        through the weight views or in-place ops on the parameters, not through
        `param.data`, which no version counter sees (`fxlens.runtime.prefix`).
        Returns self.
        """
        self._compiled = CompiledRunner(self, backend=backend, mode=mode, options=options,
                                        dynamic=dynamic, fuse_attention=fuse_attention, hooks=hooks,
                                        reuse_prefix=reuse_prefix)
        return self

    def uncompile(self) -> "HookedModel":
        """Back to the eager graph (compiled variants are dropped)."""
        self._compiled = None
        return self

    @property
    def is_compiled(self) -> bool:
        return self._compiled is not None

    @property
    def compiled_runner(self) -> CompiledRunner | None:
        """The CompiledRunner of a compiled model (None when eager)."""
        return self._compiled

    def compile_stats(self) -> dict:
        """Variants built, graphs compiled, seconds spent compiling, eager fallbacks."""
        return self._compiled.stats() if self._compiled is not None else {}

    def _graph_changed(self) -> None:
        """Call after rewriting `graph_module`: hook names are re-read and compiled
        variants of the old graph are dropped."""
        self._graph_version += 1
        self._refresh_hook_dict()
        if self._compiled is not None:
            self._compiled.clear()

    def _apply(self, fn, *args, **kwargs):
        # the captured graph keeps its dtype's casts and constants: a float dtype
        # move would fail inside the graph ("mat1 and mat2 ..."), so refuse it here
        probe = torch.zeros(1, dtype=self.cfg.dtype) if getattr(self, "cfg", None) is not None else None
        if probe is not None and probe.dtype.is_floating_point:
            moved = fn(probe)
            if isinstance(moved, torch.Tensor) and moved.dtype != probe.dtype:
                raise FxlensError(
                    f"cannot convert an instrumented model from {probe.dtype} to {moved.dtype}: its "
                    f"graph was captured in {probe.dtype} and keeps that dtype's casts and constants. "
                    f"Load it in the dtype you want: fxlens.from_pretrained(..., dtype={moved.dtype}).")
        # .to() / .half() replace buffers the compiled variants hold: rebuild them
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "_compiled", None) is not None:
            self._compiled.clear()
        # cfg follows the weights: the embedding's dtype and device are the model's
        if getattr(self, "spec", None) is not None:
            w_e = self.W_E
            self.cfg.dtype, self.cfg.device = w_e.dtype, str(w_e.device)
        return out

    # --- running -------------------------------------------------------------------------
    def _covers(self, tokens: torch.Tensor) -> bool:
        """Whether the captured graph is valid for this input's batch size and length."""
        return self.capture_info is None or self._graph_at is None or \
            self.capture_info.covers(*tokens.shape[:2])

    def _graph_for(self, tokens: torch.Tensor):
        """The graph to run `tokens` through: the captured one, or where torch.export
        could not make it valid for this shape, one exported for this length (cached)."""
        if self._covers(tokens):
            return self.graph_module
        batch, seq = tokens.shape[:2]
        key = (self._graph_version, seq)
        for gm, info in self._length_graphs.get(key, []):
            if info.covers(batch, seq):
                return gm
        gm, info = self._graph_at(batch, seq)
        self._length_graphs.setdefault(key, []).append((gm.to(tokens.device), info))
        return gm

    def _run(self, tokens: torch.Tensor, cache_names=(), mask: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict]:
        """Logits, and {name: activation in TransformerLens layout} for `cache_names`.
        `mask` [batch, pos] (checked by `_padding_mask`; None: no padding)."""
        covered = self._compiled is not None and self._covers(tokens)
        if self._compiled is not None and not covered:
            self._warn_eager_length(tokens)
        if covered and (self._compiled.hooks == "python" or not self._has_bwd_hooks()):
            # an SAE's sites are no graph nodes: they are cached by hooks, inside their site's
            # HookPoint, which the compiled variant runs as Python (fxlens.interp.saes)
            inner = self._sae_site_names(cache_names)
            if not inner:
                return self._compiled.run(tokens, cache_names, mask)
            with self._caching(inner) as store:
                logits, rest = self._compiled.run(tokens, [n for n in cache_names if n not in inner], mask)
            return logits, {**rest, **store}
        return self._run_eager(tokens, cache_names, mask)

    def _warn_eager_length(self, tokens: torch.Tensor) -> None:
        """Once per input length: a compiled model runs the eager per-length graph for an
        input the captured graph is not valid for (fxlens compiles the captured one)."""
        seen = self.__dict__.setdefault("_eager_lengths", set())
        if tokens.shape[1] in seen:
            return
        seen.add(tokens.shape[1])
        info = self.capture_info
        fmt = lambda r: f"{r[0]}..{'' if r[1] is None else r[1]}"  # noqa: E731
        warnings.warn(f"compiled: a [batch, pos] = {list(tokens.shape[:2])} input runs eagerly, on a graph "
                      f"exported for its length: the compiled graph holds for sequence lengths "
                      f"{fmt(info.seq_range)} and batch sizes {fmt(info.batch_range)} ({info.method} capture)",
                      CompileFallbackWarning, stacklevel=4)

    def _has_bwd_hooks(self) -> bool:
        # backward hooks are tensor hooks registered as a HookPoint runs: between compiled
        # segments (hooks="python"), or only in the eager graph (hooks="traced")
        return any(hp.bwd_hooks for hp in self.hook_dict.values())

    def _call_graph(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        gm = self._graph_for(tokens)
        return gm(tokens) if mask is None else gm(tokens, mask)

    def _run_eager(self, tokens: torch.Tensor, cache_names=(), mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict]:
        if not cache_names:
            return self._call_graph(tokens, mask), {}
        with self._caching(cache_names) as store:
            logits = self._call_graph(tokens, mask)
        return logits, store

    @contextlib.contextmanager
    def _caching(self, names):
        """Yields {name: activation}, filled as the sites run in the block."""
        store: dict[str, torch.Tensor] = {}

        def save(tensor, hook):
            store[hook.name] = tensor.detach()

        # cache hooks go after the user's, so the cache shows edited values
        with self.hooks(fwd_hooks=[(n, save) for n in names]):
            yield store

    # --- padding ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _hooks_off(self):
        """Every hook (permanent ones too) detached for the duration: internal probes."""
        saved = {name: hp.fwd_hooks for name, hp in self.hook_dict.items()}
        try:
            for hp in self.hook_dict.values():
                hp.fwd_hooks = []
            yield
        finally:
            for name, hooks in saved.items():
                self.hook_dict[name].fwd_hooks = hooks

    def padding_support(self, side: str) -> str:
        """"" where a batch padded on `side` ("left" | "right") gives each row the
        numbers of its own run, else why not. Checked once per graph on a probe
        (first use): a 5-token row padded to 7 on each side against the row alone."""
        key = (self._graph_version, side)
        cached = self._padding_probe.get(key)
        if cached is None:
            cached = self._padding_probe[key] = self._probe_padding(side)
        return cached

    def _probe_padding(self, side: str) -> str:
        if not has_mask_input(self.graph_module):
            return ("its HF forward takes no attention_mask, so the captured graph has no mask input "
                    "and pad tokens would be attended to")
        n, pad = min(7, self.cfg.n_ctx), 2
        if n <= pad:
            return f"its context (n_ctx={self.cfg.n_ctx}) is too short to probe padding"
        gen = torch.Generator().manual_seed(3)
        row = torch.randint(0, self.cfg.d_vocab, (2, n - pad), generator=gen).to(self.cfg.device)
        fill = torch.zeros(2, pad, dtype=torch.long, device=row.device)
        real = torch.ones_like(row)
        padded = torch.cat([fill, row], 1) if side == "left" else torch.cat([row, fill], 1)
        mask = torch.cat([fill, real], 1) if side == "left" else torch.cat([real, fill], 1)
        at = slice(pad, None) if side == "left" else slice(0, n - pad)
        with torch.no_grad(), self._hooks_off():
            want = self._call_graph(row).float()
            got = self._call_graph(padded, mask).float()
        if not torch.isfinite(got).all():
            return f"a {side}-padded probe gives non-finite logits"
        err = (got[:, at] - want).abs().max().item()
        if not err <= PADDING_RTOL * max(1.0, want.abs().max().item()):
            return (f"on a {side}-padded probe the real positions' logits differ from the same row run "
                    f"alone by {err:.3g} (positions not taken from the mask: its forward takes no "
                    f"position_ids, or computes them another way)")
        return ""

    def _padding_mask(self, tokens: torch.Tensor, attention_mask) -> torch.Tensor | None:
        """The mask to run `tokens` with: None where it masks nothing; refused with
        PaddingError where this model cannot run that padding exactly."""
        if attention_mask is None:
            pad = getattr(self.capture_info, "pad_masked", None)
            if pad is not None and bool((tokens == pad).any()):
                raise PaddingError(
                    f"the tokens hold the pad token ({pad}) and no attention_mask was given: "
                    f"{self.cfg.model_name or 'this model'} masks its pad tokens itself then, and fxlens's "
                    f"graph, which takes the mask as an input, would run them unmasked. Pass "
                    f"attention_mask (1 for tokens, 0 for padding; for a right-padded batch, "
                    f"tokens != {pad}), or attention_mask=torch.ones_like(tokens) to attend to them.")
            return None
        mask = torch.as_tensor(attention_mask, device=tokens.device)
        mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
        if mask.shape != tokens.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; it must match the tokens, "
                             f"{tuple(tokens.shape)}")
        if mask.dtype == torch.bool or mask.is_floating_point():
            mask = mask != 0
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("attention_mask takes 1 (attend) and 0 (padding) only")
        mask = mask.long()
        if bool(mask.all()):
            return None
        # a 1 after a 0 in some row: left (or inner) padding, which moves positions
        side = "left" if bool(((1 - mask).cummax(-1).values.bool() & mask.bool()).any()) else "right"
        why = self.padding_support(side)
        if why:
            other = side == "left" and not self.padding_support("right")
            raise PaddingError(
                f"{self.cfg.model_name or 'this model'} cannot run a {side}-padded batch exactly: "
                f"{why}. Run the rows separately (one prompt per call, or rows of equal length)"
                f"{RIGHT_INSTEAD if other else ''}.")
        return mask

    def forward(self, input, return_type: str | None = "logits", loss_per_token: bool = False,
                prepend_bos: bool | None = None, padding_side: str | None = None,
                start_at_layer: int | None = None, stop_at_layer: int | None = None, tokens=None,
                attention_mask: torch.Tensor | None = None):
        """TransformerLens's forward. `stop_at_layer=L` returns the residual stream
        entering block L (`blocks.L.hook_resid_pre`; L = n_layers: after the last
        block). `start_at_layer=L` takes that residual as `input` [batch, pos, d_model]
        and runs blocks L.. (pass `tokens` for the loss or for the positions).

        `attention_mask` [batch, pos] (1 = token, 0 = padding): pad positions are
        masked out of attention, positions come from the mask, the loss skips
        them. A list of texts of different lengths is padded on `padding_side`
        (default: the tokenizer's) and masked so. See `padding_support`."""
        if start_at_layer is None and stop_at_layer is None:
            return self._forward(input, return_type, loss_per_token, prepend_bos, padding_side,
                                 attention_mask=attention_mask)[0]
        return self._forward_between(input, start_at_layer, stop_at_layer, return_type, loss_per_token,
                                     prepend_bos, padding_side, tokens, attention_mask)

    def _layer_index(self, layer: int, what: str) -> int:
        n = self.cfg.n_layers
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx <= n:
            raise ValueError(f"{what}={layer}: this model has {n} layers (use -{n}..{n})")
        return idx

    def _forward_between(self, input, start, stop, return_type, loss_per_token, prepend_bos,
                         padding_side, tokens, attention_mask=None):
        """Runs the eager graph: the residual is injected / taken at the resid_pre sites."""
        n = self.cfg.n_layers
        hooks, skipped = [], []
        if start is not None:
            start = self._layer_index(start, "start_at_layer")
            resid = input
            if not isinstance(resid, torch.Tensor) or resid.dim() != 3 or resid.shape[-1] != self.cfg.d_model:
                raise ValueError(f"start_at_layer takes the residual stream [batch, pos, d_model={self.cfg.d_model}]")
            if tokens is None:  # placeholder ids: only their shape (positions) matters past the start
                tokens = torch.zeros(resid.shape[:2], dtype=torch.long, device=resid.device)
            else:
                tokens, attention_mask = self._tokens_and_mask(tokens, prepend_bos, padding_side, attention_mask)
            if start < n:
                hooks.append((f"blocks.{start}.hook_resid_pre", lambda x, hook: resid.to(x.dtype)))
            else:
                hooks.append((f"blocks.{n - 1}.hook_resid_post", lambda x, hook: resid.to(x.dtype)))
            # sites before the start see placeholder tokens: their hooks sit this call out
            early = [name for name in self.hook_names
                     if not name.startswith("blocks.") or int(name.split(".")[1]) < start]
            if start < n:
                early = [e for e in early if e != f"blocks.{start}.hook_resid_pre"]
            for name in early:
                hp = self.hook_dict[name]
                skipped.append((hp, hp.fwd_hooks))
                hp.fwd_hooks = []
        else:
            tokens, attention_mask = self._tokens_and_mask(input, prepend_bos, padding_side, attention_mask)
        mask = self._padding_mask(tokens, attention_mask)

        class _Stop(Exception):
            pass

        if stop is not None:
            stop = self._layer_index(stop, "stop_at_layer")
            site = f"blocks.{stop}.hook_resid_pre" if stop < n else f"blocks.{n - 1}.hook_resid_post"

            def stop_here(x, hook):
                raise _Stop(x)

            hooks.append((site, stop_here))
        try:
            with self.hooks(fwd_hooks=hooks):
                logits = self._call_graph(tokens, mask)
        except _Stop as stopped:
            return stopped.args[0]
        finally:
            for hp, saved in skipped:
                hp.fwd_hooks = saved
        return _outputs(logits, tokens, return_type, loss_per_token, mask)

    def _forward(self, input, return_type: str | None = "logits", loss_per_token: bool = False,
                 prepend_bos: bool | None = None, padding_side: str | None = None, cache_names=(),
                 attention_mask: torch.Tensor | None = None):
        tokens, attention_mask = self._tokens_and_mask(input, prepend_bos, padding_side, attention_mask)
        mask = self._padding_mask(tokens, attention_mask)
        logits, store = self._run(tokens, cache_names, mask)
        return _outputs(logits, tokens, return_type, loss_per_token, mask), store

    def run_with_hooks(self, *model_args, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True,
                       clear_contexts: bool = False, **model_kwargs):
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks, reset_hooks_end=reset_hooks_end,
                        clear_contexts=clear_contexts):
            return self(*model_args, **model_kwargs)

    def _names(self, names_filter: NamesFilter) -> list[str]:
        if names_filter is None:
            return self.hook_names
        if isinstance(names_filter, str):
            self._hook_point(names_filter)
            return [names_filter]
        if callable(names_filter):
            names = [n for n in self.hook_names if names_filter(n)]
            if not names:
                raise InputError(
                    f"names_filter matched none of this model's {len(self.hook_names)} hook names "
                    f"({self.hook_names[0]}, ..., {self.hook_names[-1]}); `model.hook_names` lists "
                    f"them (opt-in sites such as attn.hook_result are made when named in a list)")
            return names
        names = list(names_filter)
        if not names:
            raise InputError("names_filter is an empty list, so nothing would be cached; name hooks "
                             "(`model.hook_names` lists them) or pass names_filter=None for all")
        for n in names:
            self._hook_point(n)
        return [n for n in self.hook_names if n in set(names)]

    def run_with_cache(self, *model_args, names_filter: NamesFilter = None, device=None,
                       remove_batch_dim: bool = False, return_cache_object: bool = True,
                       incl_bwd: bool = False, pos_slice=None, reset_hooks_end: bool = True,
                       clear_contexts: bool = False, **model_kwargs):
        """TransformerLens's run_with_cache. `incl_bwd=True` runs with gradients, calls
        `backward()` on the output (which must be a scalar: `return_type="loss"`) and adds
        `<name>_grad`, the gradient with respect to each cached site. `pos_slice` keeps
        those positions of each activation (TransformerLens's position dim per site)."""
        if not reset_hooks_end:
            raise NotApplicableError("run_with_cache(reset_hooks_end=False): fxlens's cache hooks live "
                                     "for the call; to keep caching on the model use add_caching_hooks")
        names = self._names(names_filter)
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise FxlensError(f"run_with_cache(device={device!r}): this machine has no CUDA device; "
                              f"pass device='cpu' or leave device unset")
        if incl_bwd:
            out, store = self._forward_backward(model_args, model_kwargs, names)
        else:
            with torch.no_grad():
                out, store = self._forward(*model_args, cache_names=names, **model_kwargs)
        order = [k for n in self.hook_names for k in (n, n + "_grad")]
        ordered = {k: slice_positions(k, store[k].to(device) if device is not None else store[k], pos_slice)
                   for k in order if k in store}
        if clear_contexts:
            self.clear_contexts()
        cache = ActivationCache(ordered, self)
        if remove_batch_dim:
            cache = cache.remove_batch_dim()
        return out, (cache if return_cache_object else cache.cache_dict)

    def _forward_backward(self, model_args, model_kwargs, names) -> tuple[torch.Tensor, dict]:
        grads: dict[str, torch.Tensor] = {}

        def save_grad(grad, hook):
            grads[hook.name + "_grad"] = grad.detach()

        with torch.enable_grad(), self.hooks(bwd_hooks=[(n, save_grad) for n in names]):
            out, store = self._forward(*model_args, cache_names=names, **model_kwargs)
            if not isinstance(out, torch.Tensor) or out.numel() != 1:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise FxlensError(
                    f"run_with_cache(incl_bwd=True) calls backward() on the output, which is "
                    f"{shape}; it needs a scalar: pass return_type='loss' (or hook the sites "
                    f"with bwd_hooks and call backward on a scalar of your own)")
            if not out.requires_grad:
                raise FxlensError(
                    "run_with_cache(incl_bwd=True): the output does not require grad (no "
                    "parameter has requires_grad=True); enable it with "
                    "model.requires_grad_(True)")
            out.backward()
        return out, {**store, **grads}

    # --- tokens ---------------------------------------------------------------------------
    def _tokens_and_mask(self, input, prepend_bos, padding_side, attention_mask=None):
        """(tokens, mask or None): text is tokenized and, where rows differ in
        length, padded on `padding_side` with the mask of that padding (a mask
        given wins)."""
        if _is_text(input):
            tokens, mask = self._tokenize(input, prepend_bos, padding_side)
            attention_mask = mask if attention_mask is None else attention_mask
        else:
            tokens = input
        return self._as_tokens(tokens, prepend_bos, padding_side), attention_mask

    def _as_tokens(self, input, prepend_bos, padding_side) -> torch.Tensor:
        if _is_text(input):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        elif isinstance(input, torch.Tensor):
            if input.dim() not in (1, 2):
                raise InputError(
                    f"token ids have shape {tuple(input.shape)}; fxlens takes [batch, pos] (or [pos]). "
                    f"Run several batches one by one, or flatten them: tokens.reshape(-1, tokens.shape[-1])")
            tokens = input if input.dim() == 2 else input.unsqueeze(0)
        else:
            raise TypeError(f"input must be text, a list of texts or a token tensor, not {type(input).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be integer ids, got {tokens.dtype}")
        if tokens.shape[0] == 0:
            raise InputError(f"token ids have shape {tuple(tokens.shape)}: a batch of no rows; "
                             f"pass at least one row [1, pos]")
        if tokens.shape[-1] > self.cfg.n_ctx:
            raise ContextLengthError(
                f"input has {tokens.shape[-1]} tokens; {self.cfg.model_name or 'the model'} has a "
                f"context of n_ctx={self.cfg.n_ctx}. Truncate the input (to_tokens(..., truncate=True)).")
        if tokens.shape[-1] == 0:
            raise InputError(f"input has no tokens (shape {tuple(tokens.shape)}); pass at least one "
                             f"token per row, e.g. the BOS token")
        if (tokens.min() < 0) or (tokens.max() >= self.cfg.d_vocab):
            raise ValueError(f"token ids must lie in [0, {self.cfg.d_vocab}); got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        return tokens.to(self.cfg.device)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise FxlensError("this model has no tokenizer; pass token ids, or load with tokenizer=...")
        return self.tokenizer

    def _bos(self, prepend_bos: bool | None) -> bool:
        prepend = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        return bool(prepend) and self._need_tokenizer().bos_token_id is not None

    def to_tokens(self, input, prepend_bos: bool | None = None, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = True) -> torch.Tensor:
        """Text -> [batch, pos] ids. The BOS token is prepended by fxlens (never twice),
        following TransformerLens's `default_prepend_bos`; texts of different
        lengths are padded on `padding_side` (default: the tokenizer's, else right)
        with the pad token (else eos). `forward` on the same texts masks that padding."""
        out, _ = self._tokenize(input, prepend_bos, padding_side, truncate)
        return out.to(self.cfg.device) if move_to_device else out

    def _tokenize(self, input, prepend_bos, padding_side, truncate: bool = True):
        """(ids [batch, pos] on the CPU, mask [batch, pos] or None where no row is padded)."""
        tok = self._need_tokenizer()
        texts = [input] if isinstance(input, str) else list(input)
        bos = self._bos(prepend_bos)
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        if bos:
            ids = [[tok.bos_token_id] + x for x in ids]
        if truncate:
            ids = [x[: self.cfg.n_ctx] for x in ids]
        width = max(len(x) for x in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        side = padding_side or getattr(tok, "padding_side", "right") or "right"
        if side not in ("left", "right"):
            raise ValueError(f"padding_side={side!r}; use 'left' or 'right'")

        def padded(x: list, fill):
            more = [fill] * (width - len(x))
            return x + more if side == "right" else more + x

        out = torch.tensor([padded(x, pad) for x in ids], dtype=torch.long)
        if all(len(x) == width for x in ids):
            return out, None
        return out, torch.tensor([padded([1] * len(x), 0) for x in ids], dtype=torch.long)

    def to_string(self, tokens):
        tok = self._need_tokenizer()
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 2:
            return [tok.decode(t) for t in tokens]
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 0:
            tokens = tokens.unsqueeze(0)
        return tok.decode(tokens)

    def to_str_tokens(self, input, prepend_bos: bool | None = None) -> list[str]:
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos)[0]
        elif isinstance(input, torch.Tensor):
            tokens = input.squeeze(0) if input.dim() == 2 else input
            if tokens.dim() != 1:
                raise ValueError("to_str_tokens takes one sequence; index a batch first")
        else:
            tokens = torch.tensor(input)
        return [self._need_tokenizer().decode([int(t)]) for t in tokens]

    def to_single_token(self, string: str) -> int:
        tokens = self.to_tokens(string, prepend_bos=False)[0]
        if tokens.numel() != 1:
            raise ValueError(f"{string!r} is {tokens.numel()} tokens, not one")
        return int(tokens[0])

    def __repr__(self) -> str:
        c = self.cfg
        return (f"HookedModel({c.model_name!r}: {c.n_layers} layers, d_model={c.d_model}, "
                f"{c.n_heads} heads, {len(self.hook_dict)} hooks)")

    # --- loading -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_name, *, hf_model=None, dtype=torch.float32,
                        default_padding_side: str | None = None, **kwargs):
        """`fxlens.from_pretrained` under TransformerLens's name: `model_name` is a
        checkpoint folder or a hub id already in the local HF cache (TransformerLens's
        own aliases such as "gpt2-small" are not known), `hf_model=` an HF model."""
        flags = {f: kwargs.pop(f, on) for f, on in DEFAULT_FLAGS.items()}
        return _loaded(flags, model_name, hf_model, dtype, default_padding_side, kwargs)

    @classmethod
    def from_pretrained_no_processing(cls, model_name, *, hf_model=None, dtype=torch.float32,
                                      default_padding_side: str | None = None, **kwargs):
        return _loaded({}, model_name, hf_model, dtype, default_padding_side, kwargs)


class HookedEncoder(HookedModel):
    """A HookedModel for encoders, with TransformerLens HookedEncoder's call:
    `model(input, return_type="logits", token_type_ids=None, one_zero_attention_mask=None)`.

    Text input is tokenized with the tokenizer's special tokens ([CLS] ... [SEP])
    and padded, and its attention mask is used. The output is the MLM logits
    [batch, pos, d_vocab]; a model without an MLM head (BertModel) returns its
    last residual [batch, pos, d_model].
    """

    @property
    def has_head(self) -> bool:
        return self.spec.unembed is not None

    def __repr__(self) -> str:
        return "HookedEncoder" + super().__repr__()[len("HookedModel"):]

    def forward(self, input, return_type: str | None = "logits", token_type_ids=None,
                one_zero_attention_mask=None):
        return self._forward(input, return_type, token_type_ids=token_type_ids,
                             one_zero_attention_mask=one_zero_attention_mask)[0]

    def _forward(self, input, return_type: str | None = "logits", token_type_ids=None,
                 one_zero_attention_mask=None, cache_names=(), **unused):
        if return_type not in ("logits", None):
            raise ValueError(f"return_type={return_type!r}; an encoder returns 'logits' or None")
        bad = {k: v for k, v in unused.items() if v not in (None, False)}
        if bad:
            raise TypeError(f"{sorted(bad)} do not apply to an encoder")
        if isinstance(input, str) or (isinstance(input, list) and input and isinstance(input[0], str)):
            tokens, types, mask = self.to_tokens(input)
            token_type_ids = types if token_type_ids is None else token_type_ids
            one_zero_attention_mask = mask if one_zero_attention_mask is None else one_zero_attention_mask
        else:
            tokens = input
        # contiguous: compiled graphs guard the tokens' strides against the bound inputs' sizes
        tokens = self._as_tokens(tokens, None, None).contiguous()
        with self._bind_inputs(tokens, attention_mask=one_zero_attention_mask, token_type_ids=token_type_ids):
            return super()._forward(tokens, return_type="logits" if return_type else None,
                                    cache_names=cache_names)

    @contextlib.contextmanager
    def _bind_inputs(self, tokens: torch.Tensor, **given):
        """The mask and token types of one call, on the graph's EncoderInputs module.
        Both are always bound (defaults made here), so a compiled graph sees one
        kind of input whether or not a mask is given."""
        inputs = getattr(self.graph_module, INPUTS, None)
        takes = {n.args[1] for n in self.graph_module.graph.nodes if n.op == "call_module" and n.target == INPUTS}
        bound = {}
        for key, value in given.items():
            if value is not None and key not in takes:
                raise ValueError(f"{key} given, but {self.cfg.model_name or 'this model'} does not read it")
            if key not in takes:
                continue
            if value is None:
                value = torch.ones_like(tokens) if key == "attention_mask" else torch.zeros_like(tokens)
            value = torch.as_tensor(value)
            value = value.unsqueeze(0) if value.dim() == 1 else value
            if value.shape != tokens.shape:
                raise ValueError(f"{key} has shape {tuple(value.shape)}; the tokens are {tuple(tokens.shape)}")
            bound[key] = value = value.to(device=tokens.device, dtype=torch.long)
            # dynamo takes tensors held by a module as static-shaped: one compile for
            # every batch and length needs them marked like the token input
            torch._dynamo.maybe_mark_dynamic(value, 0)
            torch._dynamo.maybe_mark_dynamic(value, 1)
        if inputs is None:
            yield
            return
        before = inputs.bound
        inputs.bound = bound
        try:
            yield
        finally:
            inputs.bound = before

    def encoder_output(self, tokens, token_type_ids=None, one_zero_attention_mask=None) -> torch.Tensor:
        """The last block's normalized residual [batch, pos, d_model]."""
        name = f"blocks.{self.cfg.n_layers - 1}.hook_normalized_resid_post"
        _, cache = self.run_with_cache(tokens, names_filter=name, return_type=None, token_type_ids=token_type_ids,
                                       one_zero_attention_mask=one_zero_attention_mask)
        return cache[name]

    # --- tokens ---------------------------------------------------------------------
    def to_tokens(self, input, move_to_device: bool = True, truncate: bool = True):
        """Text -> (tokens, token_type_ids, attention_mask), each [batch, pos], with the
        tokenizer's special tokens and right padding (TransformerLens HookedEncoder)."""
        tok = self._need_tokenizer()
        enc = tok(input, return_tensors="pt", padding=True, truncation=truncate,
                  max_length=self.cfg.n_ctx if truncate else None)
        tokens = enc["input_ids"]
        types = enc.get("token_type_ids")
        types = torch.zeros_like(tokens) if types is None else types
        mask = enc.get("attention_mask")
        mask = torch.ones_like(tokens) if mask is None else mask
        out = (tokens, types, mask)
        return tuple(t.to(self.cfg.device) for t in out) if move_to_device else out

    def to_str_tokens(self, input, prepend_bos: bool | None = None) -> list[str]:
        if isinstance(input, str):
            input = self.to_tokens(input)[0][0]
        return super().to_str_tokens(input)

    def to_single_token(self, string: str) -> int:
        ids = self._need_tokenizer()(string, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens, not one")
        return int(ids[0])


def _hook_list(hp: HookPoint, dir: str) -> list:
    if dir not in ("fwd", "bwd"):
        raise ValueError(f"hook direction {dir!r}: use 'fwd' or 'bwd'")
    return hp.fwd_hooks if dir == "fwd" else hp.bwd_hooks


def _is_text(input) -> bool:
    return isinstance(input, str) or (isinstance(input, (list, tuple)) and bool(input)
                                      and isinstance(input[0], str))


def _outputs(logits, tokens, return_type, loss_per_token, mask=None):
    """What `forward` returns for each TransformerLens `return_type` (the loss
    skips masked positions)."""
    if return_type == "logits":
        return logits
    if return_type is None:
        return None
    if return_type not in ("loss", "both"):
        raise ValueError(f"return_type={return_type!r}; use 'logits', 'loss', 'both' or None")
    loss = lm_cross_entropy_loss(logits, tokens, mask, per_token=loss_per_token)
    return loss if return_type == "loss" else (logits, loss)


# TransformerLens keywords that fxlens's loaders cannot honour, and why
_REFUSED_LOAD_KWARGS = {
    "checkpoint_index": "training checkpoints are separate HF revisions: pass revision=...",
    "checkpoint_value": "training checkpoints are separate HF revisions: pass revision=...",
    "first_n_layers": "fxlens captures the whole model; truncate the HF model's layers before passing it",
    "n_devices": "place the model across devices with device_map=...",
}


def _loaded(flags: dict, model_name, hf_model, dtype, default_padding_side, kwargs):
    for key, why in _REFUSED_LOAD_KWARGS.items():
        if key in kwargs and not (key == "n_devices" and kwargs[key] == 1):
            raise NotApplicableError(f"from_pretrained({key}=...): {why}")
    kwargs.pop("n_devices", None)
    kwargs.pop("move_to_device", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = load((HookedModel, HookedEncoder), hf_model if hf_model is not None else model_name, flags,
                 dtype=dtype, **kwargs)
    if default_padding_side is not None and model.tokenizer is not None:
        model.tokenizer.padding_side = default_padding_side
    return model
