"""A decode graph: one new token against cached keys and values.

Built by rewriting a copy of the instrumented graph (hook points shared, so
hooks fire at every step on the new position, as TransformerLens's KV cache):

  per attention   k, v operands of QK^T / pattern@V  ->  cat(past, new) on the
                  sequence axis; the concatenations become extra graph outputs
  the mask        with one query position every cached key is visible, so the
                  additive causal mask is dropped
  positions       every arange over the sequence (position ids, rotary) is
                  shifted by the number of cached positions (a new input)

Whether that holds for a model (positions computed otherwise, a sliding
window) is not assumed: `build_decoder` checks step-by-step logits against
the full graph on a probe and returns None, with the reason, when they differ.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph import MATMUL_OPS, same_size, shape, val

aten = torch.ops.aten

# one-token steps vs the full graph, float32: rounding only (~1e-6 of the logits)
DECODE_RTOL = 1e-4


def _site(graph: fx.Graph, name: str) -> fx.Node:
    return next(n for n in graph.nodes if any(s[0] == name for s in n.meta.get("fxlens.sites", [])))


def _scores_chain(softmax: fx.Node) -> list[fx.Node]:
    """softmax input back to the QK^T matmul, through hooks, scaling, mask, soft-cap."""
    chain, n = [], softmax.args[0]
    while n.op != "call_function" or n.target not in MATMUL_OPS:
        chain.append(n)
        ins = [a for a in n.all_input_nodes if val(a) is not None and val(a).dim() == 4]
        if not ins:
            raise LookupError(f"no QK^T matmul behind {softmax.name}")
        n = ins[0] if len(ins) == 1 else next(a for a in ins if a.op != "placeholder")
        if n.op == "call_function" and n.target in MATMUL_OPS:
            break
    chain.append(n)
    return chain


class Decoder:
    def __init__(self, model, gm: fx.GraphModule, kv_shapes: list):
        self.model, self.gm, self.kv_shapes = model, gm, kv_shapes
        self._compiled = None   # (runner, compiled fn) while the model is compiled

    def _fn(self):
        """The decode graph, through torch.compile when the model is compiled (dynamic
        shapes: the growing cache does not recompile at every step)."""
        runner = getattr(self.model, "_compiled", None)
        if runner is None:
            return self.gm
        if self._compiled is None or self._compiled[0] is not runner:
            def backend(gm, example_inputs, inner=runner._inner_backend()):
                runner.compilations += 1
                return inner(gm, example_inputs)
            self._compiled = (runner, torch.compile(self.gm, backend=backend, dynamic=True))
        return self._compiled[1]

    def empty_past(self, batch: int, device, dtype) -> list[torch.Tensor]:
        return [torch.zeros([batch if d == "b" else 0 if d == "s" else d for d in s], device=device, dtype=dtype)
                for s in self.kv_shapes]

    def step(self, token: torch.Tensor, past: list[torch.Tensor], offset: int):
        """token [batch, 1] -> (logits [batch, 1, vocab], new past)."""
        out = self._fn()(token, torch.tensor(offset, device=token.device), *past)
        return out[0], list(out[1:])


def _build(model) -> Decoder:
    src = model.graph_module
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    logits = graph.graph_copy(src.graph, env)        # the copy's logits node (no output node yet)
    ids = next(n for n in graph.nodes if n.op == "placeholder")
    batch, seq = shape(ids)
    with graph.inserting_after(ids):
        offset = graph.placeholder("position_offset")
    pasts, cats, kv_shapes = [], [], []
    last_placeholder = offset
    for layer in range(model.cfg.n_layers):
        softmax = _site(graph, f"blocks.{layer}.attn.hook_pattern")
        z = _site(graph, f"blocks.{layer}.attn.hook_z")
        chain = _scores_chain(softmax)
        scores_mm = chain[-1]
        # drop the additive mask: one query position sees every cached key
        for n in chain[:-1]:
            if n.op == "call_function" and n.target is aten.add.Tensor:
                keep = [a for a in n.args if a in chain]
                if len(keep) == 1:
                    n.replace_all_uses_with(keep[0])
        k_idx = 2 if scores_mm.target is aten.baddbmm.default else 1
        for mm, i in ((scores_mm, k_idx), (z, 1)):
            x = mm.args[i]
            s = shape(x)
            dim = next(d for d, size in enumerate(s) if same_size(size, seq))
            with graph.inserting_after(last_placeholder):
                past = graph.placeholder(f"past_{layer}_{len(pasts)}")
            last_placeholder = past
            with graph.inserting_before(mm):
                cat = graph.call_function(aten.cat.default, ([past, x], dim))
            mm.replace_input_with(x, cat)
            pasts.append(past)
            cats.append(cat)
            kv_shapes.append(["b" if same_size(d, batch) else "s" if same_size(d, seq) else int(d) for d in s])
    # positions: every arange over the sequence starts at the offset
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target in (aten.arange.default, aten.arange.start) \
                and shape(n) and len(shape(n)) == 1 and same_size(shape(n)[0], seq):
            with graph.inserting_after(n):
                shifted = graph.call_function(aten.add.Tensor, (n, offset))
            n.replace_all_uses_with(shifted, delete_user_cb=lambda u: u is not shifted)
    graph.output((logits, *cats))
    gm = fx.GraphModule(src, graph)   # shares parameters and hook points with the model
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return Decoder(model, gm, kv_shapes)


def build_decoder(model, probe_len: int = 6) -> tuple[Decoder | None, str]:
    """The decode graph, checked against the full graph; (None, reason) if it differs."""
    try:
        dec = _build(model)
    except (LookupError, StopIteration, RuntimeError) as exc:
        return None, f"the attention could not be rewritten for a KV cache ({exc})"
    probe = torch.randint(0, model.cfg.d_vocab, (2, min(probe_len, model.cfg.n_ctx)),
                          generator=torch.Generator().manual_seed(2)).to(model.cfg.device)
    saved = {name: hp.fwd_hooks for name, hp in model.hook_dict.items()}
    try:
        for hp in model.hook_dict.values():
            hp.fwd_hooks = []
        with torch.no_grad():
            want = model._graph_for(probe)(probe)
            past = dec.empty_past(probe.shape[0], probe.device, want.dtype)
            got = []
            for i in range(probe.shape[1]):
                logits, past = dec.step(probe[:, i:i + 1], past, i)
                got.append(logits)
    except Exception as exc:  # any failure means: no KV cache for this model
        return None, f"the decode graph does not run ({type(exc).__name__}: {exc})"
    finally:
        for name, hooks in saved.items():
            model.hook_dict[name].fwd_hooks = hooks
    got = torch.cat(got, dim=1)
    err = (got - want).abs().max().item()
    if not err <= DECODE_RTOL * max(1.0, want.abs().max().item()):
        return None, f"one-token steps differ from the full graph by {err:.3g} (positions or masks " \
                     f"computed in a way the rewrite does not shift)"
    return dec, ""
