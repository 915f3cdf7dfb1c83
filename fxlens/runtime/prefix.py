"""Prefix reuse for compiled sweeps: the work before the first hook is done once.

A segmented variant (`hooks="python"`, fxlens/runtime/compiled.py) runs its
compiled segments with the hooks between them. Everything before the first
hooked site -- the embedding and every block above the hooked one -- is a pure
function of the graph inputs (token ids, mask) and the weights: segments are
functional graphs (no node mutates anything; `PrefixReuse.build` refuses a
variant where one could). A patching sweep over positions at
`blocks.L.hook_resid_pre` calls the same corrupted tokens over and over, so that
prefix is the same every call. `PrefixReuse` splits the variant's top-level graph
into the prefix and the rest and reuses the prefix's outputs when a call's inputs
and weights are the last call's:

  inputs    equal values (the last call's inputs are kept as copies, so a tensor
            the caller edits in place afterwards does not match)
  weights   every parameter and buffer the prefix reads: the same tensor, the same
            storage, dtype, device and shape, and the same version counter (an
            in-place edit, `load_state_dict`, a weight-editing API bumps it)
  grad      never with autograd recording (grad enabled and a weight or input
            that requires grad): backward hooks and `.backward()` see a fresh graph
  mode      inference mode and autocast (on, off, its dtype) as last time

Opt-in (`model.compile(reuse_prefix=True)`), because one kind of weight edit
cannot be seen: a write through `param.data` (`p.data[...] = x`,
`p.data.copy_(y)`) bumps no version counter. Edits through fxlens's weight views
(`model.blocks[L].attn.W_O[h] = 0`), in-place ops on the parameters under
`torch.no_grad()`, `load_state_dict` and `.to()` are all seen.

Kept prefixes share one budget per runner (`KeptBudget`, 1 GiB by default):
past it, the least recently used variant's kept outputs are dropped (it runs its
prefix again next time), so a sweep over many layers does not pin one residual
stream per layer without bound.

The kept outputs are only ever handed to compiled segments, which read them; an
output that reaches a hook (the hooked activation itself, which a patching hook
edits in place), the caller's cache or anything else is handed out as a copy.
Anything that does not match runs the prefix again.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxlens.passes.segment import Segment


def _mutates(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and getattr(getattr(n.target, "_schema", None), "is_mutable", False)
               for n in gm.graph.nodes)


def _weight_key(t) -> tuple | None:
    if not isinstance(t, torch.Tensor):
        return ("value", t)
    if t.is_inference():
        return None       # no version counter: an in-place edit could not be seen
    return (id(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))


def _same_input(kept, new) -> bool:
    if isinstance(kept, torch.Tensor) != isinstance(new, torch.Tensor):
        return False
    if not isinstance(new, torch.Tensor):
        return kept == new
    return (kept.shape == new.shape and kept.dtype == new.dtype and kept.device == new.device
            and torch.equal(kept, new))


class KeptBudget:
    """The bytes the kept prefixes of one runner may hold; least recently used first out."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._held: dict = {}           # PrefixReuse -> bytes, oldest first

    def hold(self, owner: "PrefixReuse", nbytes: int) -> bool:
        """Record `owner`'s kept outputs (most recent); False if they alone exceed the budget."""
        self._held.pop(owner, None)
        if nbytes > self.max_bytes:
            return False
        self._held[owner] = nbytes
        while sum(self._held.values()) > self.max_bytes:
            oldest = next(iter(self._held))
            del self._held[oldest]
            oldest._kept = None
        return True

    def touch(self, owner: "PrefixReuse") -> None:
        if owner in self._held:
            self._held[owner] = self._held.pop(owner)


def _nbytes(values) -> int:
    return sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))


def _autocast_state() -> tuple:
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))


class PrefixReuse:
    """A segmented variant's top-level graph as prefix + rest, the prefix's outputs
    reused while inputs and weights are unchanged. Counts `hits` and `misses`."""

    def __init__(self, prefix: fx.GraphModule, rest: fx.GraphModule, weights: list[str],
                 copy_out: list[bool], budget: KeptBudget | None = None):
        self.prefix, self.rest = prefix, rest
        # the tensors the prefix's get_attr nodes read (the prefix module holds them)
        self.weights = [operator.attrgetter(t)(prefix) for t in weights]
        self.copy_out = copy_out
        self.budget = budget if budget is not None else KeptBudget()
        self.hits = self.misses = 0
        self._kept = None          # (inputs, weight keys, mode, outputs)

    @classmethod
    def build(cls, top: fx.GraphModule, budget: KeptBudget | None = None) -> "PrefixReuse | None":
        """None where there is nothing to reuse (no segment before the first hook) or a
        segment could mutate a value it reads."""
        graph = top.graph
        segments = {n for n in graph.nodes
                    if n.op == "call_module" and isinstance(top.get_submodule(n.target), Segment)}
        if any(_mutates(top.get_submodule(n.target).graph_module) for n in segments):
            return None
        # the rest: every node downstream of a hook (a call_module that is no Segment)
        later: set[fx.Node] = set()
        for n in graph.nodes:
            if n.op == "output" or (n.op == "call_module" and n not in segments) or \
                    any(a in later for a in n.all_input_nodes):
                later.add(n)
        early = [n for n in graph.nodes if n not in later and n.op != "placeholder"]
        if not any(n in segments for n in early):
            return None
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        crossing = [n for n in early if n.op != "get_attr" and any(u in later for u in n.users)]
        # prefix(*inputs) -> the values the rest reads
        pg, env = fx.Graph(), {}
        for p in placeholders:
            env[p] = pg.node_copy(p)
        for n in early:
            env[n] = pg.node_copy(n, lambda a: env[a])
        pg.output(tuple(env[n] for n in crossing))
        # rest(*crossing, *inputs) -> the variant's outputs; weights re-read by get_attr
        rg, renv = fx.Graph(), {}
        for i, n in enumerate(crossing):
            renv[n] = rg.placeholder(f"prefix_{i}")
            if "val" in n.meta:
                renv[n].meta["val"] = n.meta["val"]
        for p in placeholders:
            renv[p] = rg.node_copy(p)

        def arg(a):
            if a not in renv and a.op == "get_attr":
                renv[a] = rg.node_copy(a)
            return renv[a]

        for n in graph.nodes:
            if n in later:
                renv[n] = rg.node_copy(n, arg)
        copy_out = [not all(u.op == "call_module" and u in segments for u in n.users if u in later)
                    for n in crossing]
        weights = [n.target for n in early if n.op == "get_attr"]
        return cls(fx.GraphModule(top, pg, class_name="FxlensPrefix"),
                   fx.GraphModule(top, rg, class_name="FxlensRest"), weights, copy_out, budget)

    def __call__(self, *args):
        weights = self.weights
        recording = torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in (*weights, *args))
        keys = None if recording else [_weight_key(w) for w in weights]
        reusable = keys is not None and None not in keys
        mode = (torch.is_inference_mode_enabled(), _autocast_state())
        kept = self._kept
        if reusable and kept is not None and kept[1] == keys and kept[2] == mode and \
                len(kept[0]) == len(args) and all(_same_input(k, a) for k, a in zip(kept[0], args)):
            self.hits += 1
            self.budget.touch(self)
            outs = kept[3]
        else:
            self.misses += 1
            outs = self.prefix(*args)
            self._kept = None
            if reusable:
                copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
                if self.budget.hold(self, _nbytes(outs) + _nbytes(copies)):
                    self._kept = (copies, keys, mode, outs)
        if self._kept is not None:   # the kept outputs stay ours: hooks and callers get copies
            outs = [o.clone() if copy and isinstance(o, torch.Tensor) else o
                    for o, copy in zip(outs, self.copy_out)]
        return self.rest(*outs, *args)
