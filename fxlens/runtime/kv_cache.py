"""Generation with a KV cache: the prefill and decode graphs (the passes
`kv_prefill` and `kv_decode` of `fxlens/passes/kv_cache.py`, run by the
pipeline's KV_PREFILL and KV_DECODE on copies of the instrumented graph, hook
points shared), how they are called (eagerly, or compiled: cut into segments
at block boundaries, equal blocks compiled once, batch and lengths dynamic),
and the load check that decides whether a model
may use them.

Whether the rewrite holds for a model (positions computed otherwise) is not
assumed: `build_decoder` checks prefill and decode logits against the full
graph's (a left-padded row among them) on a probe longer than every window the
model has (the integer constants of its score terms, and the config's window
and chunk sizes), and returns None, with the reason, when they differ or the
rewrite is refused.
"""

from __future__ import annotations

import time

import torch
import torch.fx as fx

from fxlens.errors import PassError
from fxlens.pipeline import KV_ADVICE, KV_DECODE, KV_PREFILL, Context, run_pipeline
from fxlens.runtime.compiled import copy_graph_module

# decode steps vs the full graph, float32: rounding only (~1e-6 of the logits)
DECODE_RTOL = 1e-4
# tokens the probe goes past the longest window (masks are off by one either way)
PAST_WINDOW = 4
MIN_PROBE = 6
# left pads of the probe's second row (where the graph takes a mask)
PROBE_PAD = 2


class Decoder:
    """The prefill graph (the prompt in one pass, returning every layer's keys and
    values) and the decode graph (new tokens against them), sharing the model's
    parameters and hook points."""

    def __init__(self, model, prefill: fx.GraphModule, gm: fx.GraphModule,
                 windows: set[int], takes_mask: bool):
        self.model, self.prefill_gm, self.gm = model, prefill, gm
        self.windows = windows        # integer constants of the position-dependent score terms
        self.takes_mask = takes_mask  # both graphs take the attention mask (left-padded batches)
        self._runner = None           # the compiled runner the variants below belong to
        self._compiled = {}           # (graph version, hooked sites) -> (prefill, decode) variants

    def _fns(self, eager: bool):
        """(prefill, decode, compiled?): when the model is compiled, each graph specialised
        to the sites hooked now and cut into segments compiled by the model's runner
        (`CompiledRunner.kv_variant`): the blocks compile once for every layer, and
        prompts, prompt lengths and max_new_tokens reuse them (batch and lengths
        dynamic; the other sizes static, read from the graphs' values)."""
        runner = None if eager else self.model.compiled_runner
        if runner is None:
            return self.prefill_gm, self.gm, False
        if runner is not self._runner:
            self._runner, self._compiled = runner, {}
        hooked = tuple(self.model._hooked_sites())
        key = (runner._version(), hooked)
        fns = self._compiled.get(key)
        if fns is None:
            fns = self._compiled[key] = (runner.kv_variant(self.prefill_gm, hooked, "prefill"),
                                         runner.kv_variant(self.gm, hooked, "decode"))
        return fns[0], fns[1], True

    def _run(self, fn, args, compiled: bool):
        """fn(*args); a compiled call that compiled segments adds its time to the
        runner's compile_seconds (`compile_stats()`), as compiled forward calls do."""
        if not compiled:
            return fn(*args)
        before, start = self._runner.compilations, time.perf_counter()
        out = fn(*args)
        if self._runner.compilations != before:
            self._runner.compile_seconds += time.perf_counter() - start
        return out

    def prefill(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, eager: bool = False):
        """tokens [batch, pos] (mask [batch, pos], 1 token / 0 pad) -> (logits [batch, pos,
        vocab], past: each layer's keys and values at every position)."""
        fn, _, compiled = self._fns(eager)
        args = [tokens, mask if mask is not None else torch.ones_like(tokens)] if self.takes_mask else [tokens]
        out = self._run(fn, args, compiled)
        # contiguous: a key may come out as a transposed view, and compiled, the decode graph
        # guards on its inputs' strides (the concatenations it returns are contiguous)
        return out[0], [p.contiguous() for p in out[1:]]

    def step(self, tokens: torch.Tensor, mask: torch.Tensor | None, past: list[torch.Tensor], new: int = 1,
             eager: bool = False):
        """tokens [batch, pos] (every token so far; `past` caches all but the last
        `new`), mask [batch, pos] over the same tokens -> (logits [batch, new, vocab], new past)."""
        offset = tokens.shape[1] - new
        _, fn, compiled = self._fns(eager)
        # fresh tensors, not views: compiled, a view's offset and base would be guarded on
        args = [tokens[:, offset:].clone(), torch.tensor(offset, device=tokens.device), tokens]
        if self.takes_mask:
            args.append(mask if mask is not None else torch.ones_like(tokens))
        out = self._run(fn, [*args, *past], compiled)
        return out[0], [p.contiguous() for p in out[1:]]


def _build(model) -> Decoder:
    """Both graphs, each by its pipeline on a copy of the model's graph."""
    out = []
    for passes in (KV_PREFILL, KV_DECODE):
        gm, _ = copy_graph_module(model.graph_module)   # shares parameters and hook points
        ctx = Context(None, None, spec=model.spec)
        gm = run_pipeline(gm, ctx, passes, advice=KV_ADVICE)
        out.append((gm, ctx.results[-1]))
    (prefill, _), (decode, result) = out
    d = result.details
    return Decoder(model, prefill, decode, d["windows"], d["takes_mask"])


def config_windows(config) -> set[int]:
    """The integer sizes a config declares for windows or chunks of attention (any field
    named so, in the config and its sub-configs, scalars and per-layer lists)."""
    out: set[int] = set()

    def walk(d):
        for key, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif "window" in str(key) or "chunk" in str(key):
                for x in (v if isinstance(v, (list, tuple)) else [v]):
                    if isinstance(x, int) and not isinstance(x, bool) and x > 0:
                        out.add(x)

    if config is not None:
        walk(config.to_dict())
    return out


def probe_length(model, dec: Decoder) -> int:
    """Tokens the load check runs: past every window of the model, within its context."""
    n_ctx = model.cfg.n_ctx
    sizes = [w for w in dec.windows | config_windows(getattr(model, "hf_config", None)) if w < n_ctx]
    return min(n_ctx, max(MIN_PROBE, max(sizes, default=0) + PAST_WINDOW))


def build_decoder(model, probe_len: int | None = None) -> tuple[Decoder | None, str]:
    """The prefill and decode graphs, checked against the full graph; (None, reason)
    if they differ.

    The probe (2 rows; where the graph takes a mask, the second left-padded by 2)
    prefills 3 tokens, decodes 1, then all but the last 3 as one chunk, then the
    last 3 one at a time, and compares every real position's logits with the full
    graph's on the same (padded) batch: past the longest window for the price of
    two forwards."""
    mixers = [b.layer for b in model.spec.blocks if not b.has_attn and b.mixer]
    if mixers:
        return None, (f"blocks {mixers} carry a recurrent state (state-space or linear-attention "
                      f"mixers), which a KV cache does not hold")
    try:
        dec = _build(model)
    except PassError as exc:      # kv_prefill / kv_decode: what could not be carried, and where
        return None, str(exc)
    length = probe_len or probe_length(model, dec)
    probe = torch.randint(0, model.cfg.d_vocab, (2, length),
                          generator=torch.Generator().manual_seed(2)).to(model.cfg.device)
    mask = torch.ones_like(probe)
    if dec.takes_mask and length > PROBE_PAD + 1:
        mask[1, :PROBE_PAD] = 0
    ends = sorted({e for e in (3, 4, length - 3, length - 2, length - 1, length) if 1 <= e <= length})
    saved = {name: hp.fwd_hooks for name, hp in model.hook_dict.items()}
    try:
        for hp in model.hook_dict.values():
            hp.fwd_hooks = []
        with torch.no_grad():
            graph = model._graph_for(probe)
            want = graph(probe, mask) if dec.takes_mask else graph(probe)
            logits, past = dec.prefill(probe[:, :ends[0]], mask[:, :ends[0]], eager=True)
            got, done = [logits], ends[0]
            for end in ends[1:]:
                logits, past = dec.step(probe[:, :end], mask[:, :end], past, new=end - done, eager=True)
                got.append(logits)
                done = end
    except Exception as exc:  # any failure means: no KV cache for this model
        return None, f"the decode graph does not run ({type(exc).__name__}: {exc})"
    finally:
        for name, hooks in saved.items():
            model.hook_dict[name].fwd_hooks = hooks
    got = torch.cat(got, dim=1)
    real = mask.bool()[..., None]                      # pad positions' logits are no one's
    err = (got - want).abs().masked_fill(~real, 0).max().item()
    if not err <= DECODE_RTOL * max(1.0, want.masked_fill(~real, 0).abs().max().item()):
        return None, f"decode steps differ from the full graph by {err:.3g} on a {length}-token probe " \
                     f"(positions or masks computed in a way the rewrite does not shift)"
    return dec, ""
