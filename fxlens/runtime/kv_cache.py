"""A prefill graph and a decode graph: the prompt once, then new tokens against
cached keys and values.

Both are rewritten copies of the instrumented graph (hook points shared, so
hooks fire on the prompt and then at every step on the new positions, as
TransformerLens's KV cache). The prefill graph is the full graph returning,
after its logits, every layer's k and v operands (below) at all positions.
The decode graph:

  per attention   k, v operands of QK^T / pattern@V  ->  cat(past, new) on the
                  sequence axis; the concatenations become extra graph outputs
  score terms     every operand of the scores chain (QK^T .. softmax) that
                  varies with the positions and not with activations (the
                  causal / sliding-window / chunked mask, ALiBi or relative
                  position biases) is computed as the full graph computes it,
                  from all the tokens so far (a second input), and its last
                  query rows are used: the new queries against every cached
                  key, exactly. An operand that depends on activations at the
                  key positions cannot be carried: the rewrite is refused.
  the mask        the graph's attention mask covers every token so far
                  (left-padded rows); the new positions read its last columns
  positions       positions computed from the mask (fxlens.capture) are
                  computed over the whole mask as the full graph does, and the
                  new columns taken; every other arange over the sequence
                  (position ids, rotary) is shifted by the number of cached
                  positions (a new input)

Whether that holds for a model (positions computed otherwise) is not assumed:
`build_decoder` checks prefill and decode logits against the full graph's
(a left-padded row among them) on a probe longer than every window the model has (the integer constants of its
score terms, and the config's window and chunk sizes), and returns None, with
the reason, when they differ or the rewrite is refused.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxlens.frontend.decoder import MASK_INPUT, POSITIONS
from fxlens.ir.graph import MATMUL_OPS, SOFTMAX_OPS, same_size, shape, val

aten = torch.ops.aten
RESIZE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}

# decode steps vs the full graph, float32: rounding only (~1e-6 of the logits)
DECODE_RTOL = 1e-4
# tokens the probe goes past the longest window (masks are off by one either way)
PAST_WINDOW = 4
MIN_PROBE = 6
# left pads of the probe's second row (where the graph takes a mask)
PROBE_PAD = 2


def _site(graph: fx.Graph, name: str) -> fx.Node:
    return next(n for n in graph.nodes if any(s[0] == name for s in n.meta.get("fxlens.sites", [])))


def _activations(graph: fx.Graph) -> set[fx.Node]:
    """Nodes downstream of a hook point: values that depend on the activations."""
    act: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "call_module" or any(a in act for a in n.all_input_nodes):
            act.add(n)
    return act


def _scores_chain(softmax: fx.Node, act: set[fx.Node]) -> list[fx.Node]:
    """softmax input back to the QK^T matmul, through hooks, scaling, mask, soft-cap."""
    chain, n = [], softmax.args[0]
    while n.op != "call_function" or n.target not in MATMUL_OPS:
        chain.append(n)
        ins = [a for a in n.all_input_nodes if val(a) is not None and val(a).dim() == val(n).dim()]
        ins = [a for a in ins if a in act] or [a for a in ins if a.op != "placeholder"] or ins
        if not ins:
            raise LookupError(f"no QK^T matmul behind {softmax.name}")
        n = ins[0]
    chain.append(n)
    return chain


def _varies_with(size, seq) -> bool:
    """Whether a (symbolic) size is a function of the sequence length (seq, 128 - seq, ...)."""
    return isinstance(size, torch.SymInt) and isinstance(seq, torch.SymInt) \
        and bool(seq.node.expr.free_symbols & size.node.expr.free_symbols)


def _ints(args) -> list[int]:
    out: list[int] = []
    fx.node.map_aggregate(args, lambda a: out.append(a) if isinstance(a, int) and not isinstance(a, bool)
                          else None)
    return out


class Decoder:
    """The prefill graph (the prompt in one pass, returning every layer's keys and
    values) and the decode graph (new tokens against them), sharing the model's
    parameters and hook points."""

    def __init__(self, model, prefill: fx.GraphModule, gm: fx.GraphModule, kv_shapes: list,
                 windows: set[int], takes_mask: bool):
        self.model, self.prefill_gm, self.gm, self.kv_shapes = model, prefill, gm, kv_shapes
        self.windows = windows        # integer constants of the position-dependent score terms
        self.takes_mask = takes_mask  # both graphs take the attention mask (left-padded batches)
        self._compiled = None         # (runner, compiled prefill, compiled decode) while compiled

    def _fns(self, eager: bool):
        """(prefill, decode, compiled?): through torch.compile when the model is compiled;
        one graph each, their batch and lengths marked dynamic (`_dynamic`), so prompts,
        prompt lengths and max_new_tokens reuse them."""
        runner = None if eager else self.model.compiled_runner
        if runner is None:
            return self.prefill_gm, self.gm, False
        if self._compiled is None or self._compiled[0] is not runner:
            self._compiled = (runner, runner.compile_graph(self.prefill_gm, dynamic=False, label="prefill"),
                              runner.compile_graph(self.gm, dynamic=False, label="decode"))
        return self._compiled[1], self._compiled[2], True

    def prefill(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, eager: bool = False):
        """tokens [batch, pos] (mask [batch, pos], 1 token / 0 pad) -> (logits [batch, pos,
        vocab], past: each layer's keys and values at every position)."""
        fn, _, compiled = self._fns(eager)
        args = [tokens, mask if mask is not None else torch.ones_like(tokens)] if self.takes_mask else [tokens]
        if compiled:
            _dynamic(args, [[0, 1]] * len(args))
        out = fn(*args)
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
        if compiled:
            n_in = len(args)
            _dynamic(args + past, [[0]] + [[]] + [[0, 1]] * (n_in - 2) +
                     [[d for d, k in enumerate(s) if k in ("b", "s")] for s in self.kv_shapes])
        out = fn(*args, *past)
        return out[0], [p.contiguous() for p in out[1:]]


def _dynamic(args, dims) -> None:
    """Batch and lengths dynamic, every other size static (a cache length equal to d_head
    by chance is not unified with it); a size-1 dimension stays specialised by dynamo."""
    for a, ds in zip(args, dims):
        for d in ds:
            torch._dynamo.maybe_mark_dynamic(a, d)


def _build(model) -> Decoder:
    src = model.graph_module
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    logits = graph.graph_copy(src.graph, env)        # the copy's logits node (no output node yet)
    back = {v: k for k, v in env.items()}
    src_ids = next(n for n in src.graph.nodes if n.op == "placeholder")
    src_mask = next((n for n in src.graph.nodes if n.op == "placeholder" and n.target == MASK_INPUT), None)
    ids = env[src_ids]
    batch, seq = shape(ids)
    with graph.inserting_after(ids):
        offset = graph.placeholder("position_offset")
    with graph.inserting_after(offset):
        full_ids = graph.placeholder("all_input_ids")
    last_placeholder, full_mask = full_ids, None
    if src_mask is not None:
        # the decode graph's mask covers every token so far [batch, all]: the score terms
        # and positions read all of it, the new positions' other readers its last columns
        with graph.inserting_after(full_ids):
            full_mask = graph.placeholder("all_attention_mask")
        order = {n: i for i, n in enumerate(graph.nodes)}
        with graph.inserting_before(min(env[src_mask].users, key=order.__getitem__)):
            n_all = graph.call_function(aten.sym_size.int, (full_ids, 1))
            n_new = graph.call_function(aten.sym_size.int, (ids, 1))
            start = graph.call_function(operator.sub, (n_all, n_new))
            new_mask = graph.call_function(aten.slice.Tensor, (full_mask, 1, start, n_all))
        env[src_mask].replace_all_uses_with(new_mask)
        graph.erase_node(env[src_mask])
        last_placeholder = full_mask
    act = _activations(graph)
    pasts, cats, kv_src, kv_shapes, terms = [], [], [], [], []
    for layer in range(model.cfg.n_layers):
        softmax = _site(graph, f"blocks.{layer}.attn.hook_pattern")
        z = _site(graph, f"blocks.{layer}.attn.hook_z")
        chain = _scores_chain(softmax, act)
        scores_mm = chain[-1]
        if softmax.op == "call_function" and softmax.target in SOFTMAX_OPS \
                and softmax.args[1] not in (-1, val(softmax).dim() - 1):
            raise LookupError(f"{softmax.name} normalises over dim {softmax.args[1]}, not the last (keys)")
        # a reshape of the scores or the pattern that names the key length as the sequence
        # length infers it instead (the keys are the cached positions and the new ones)
        pattern = [z.args[0]]
        while pattern[-1] is not softmax and len(pattern[-1].all_input_nodes) == 1:
            pattern.append(pattern[-1].all_input_nodes[0])
        for n in chain + pattern:
            if n.op == "call_function" and n.target in RESIZE_OPS and isinstance(n.args[1], (list, tuple)) \
                    and n.args[1] and isinstance(n.args[1][-1], fx.Node) \
                    and same_size(n.args[1][-1].meta.get("val"), seq):
                n.args = (n.args[0], [*n.args[1][:-1], -1], *n.args[2:])
        # operands of the scores chain that vary with the positions
        links = set(chain)
        for n in chain:
            ops = [scores_mm.args[0]] if n is scores_mm and n.target is aten.baddbmm.default else \
                [] if n is scores_mm else [a for a in n.args if isinstance(a, fx.Node) and a not in links]
            for a in ops:
                s = shape(a)
                if s is None or not any(_varies_with(d, seq) for d in s):
                    continue  # a constant or a per-head scale: the same at every position
                if a in act:
                    if _varies_with(s[-1], seq):
                        raise LookupError(f"the score term {a.name} of layer {layer} depends on activations "
                                          f"at every key position, which the decode graph does not recompute")
                    continue  # per query position: computed on the new positions as for the full graph
                # the new query rows of it: its axis -2 where that is the queries'
                terms.append((n, a, len(s) - 2 if len(s) >= 2 and same_size(s[-2], seq) else None))
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
            kv_src.append(back[x])
            kv_shapes.append(["b" if same_size(d, batch) else "s" if same_size(d, seq) else int(d) for d in s])
    # positions computed from the mask (fxlens.capture): computed over every token's mask, as
    # the full graph does (a left-padded row counts its own tokens), and the new columns taken
    for n in [n for n in graph.nodes if n.meta.get("custom", {}).get(POSITIONS)]:
        if not any(u.meta.get("custom", {}).get(POSITIONS) for u in n.users):
            if full_mask is None:
                raise LookupError(f"{n.name} computes positions from an attention mask the graph does not take")
            axis = next(d for d, size in enumerate(shape(n)) if same_size(size, seq))
            terms.extend((u, n, axis) for u in n.users)
    # positions: every arange over the sequence starts at the offset
    for n in list(graph.nodes):
        if n.op == "call_function" and n.target in (aten.arange.default, aten.arange.start) \
                and shape(n) and len(shape(n)) == 1 and same_size(shape(n)[0], seq):
            with graph.inserting_after(n):
                shifted = graph.call_function(aten.add.Tensor, (n, offset))
            n.replace_all_uses_with(shifted, delete_user_cb=lambda u: u is not shifted)
    # the terms over all tokens read the ids (and the mask) so far
    present = set(graph.nodes)
    inputs = {p: None for p in src.graph.nodes if p.op == "placeholder" and p in env and env[p] not in present}
    inputs[src_ids] = full_ids
    if src_mask is not None:
        inputs[src_mask] = full_mask
    windows = _carry_terms(graph, src, env, back, terms, inputs, ids, full_ids)
    graph.output((logits, *cats))
    gm = fx.GraphModule(src, graph)   # shares parameters and hook points with the model
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return Decoder(model, _prefill(src, kv_src), gm, kv_shapes, windows, src_mask is not None)


def _prefill(src: fx.GraphModule, kv: list[fx.Node]) -> fx.GraphModule:
    """The full graph returning, after its logits, the keys and values (`kv`, nodes of
    `src`) the decode graph concatenates its new positions to: `(input_ids,
    attention_mask=None) -> (logits, k_0, v_0, ...)`."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    logits = graph.graph_copy(src.graph, env)
    graph.output((logits, *[env[n] for n in kv]))
    gm = fx.GraphModule(src, graph)
    gm.graph.lint()
    return gm


def _carry_terms(graph, src, env, back, terms, inputs, ids, full_ids) -> set[int]:
    """Replace each (user, operand, axis) term by the full graph's computation of it on
    all the tokens so far, sliced on `axis` to the new positions (None: used whole).
    Returns the integer constants of those computations (the window sizes among them)."""
    full: dict[fx.Node, fx.Node] = dict(inputs)     # source node -> its copy over all tokens
    rows: dict[fx.Node, fx.Node] = {}
    windows: set[int] = set()
    order = {n: i for i, n in enumerate(src.graph.nodes)}
    place = {n: i for i, n in enumerate(graph.nodes)}
    # in graph order: a computation shared by several users is placed before the first
    for user, operand, axis in sorted(terms, key=lambda t: place[t[0]]):
        top = back[operand]
        if top not in rows:
            need, todo = set(), [top]
            while todo:                                   # the term's ancestry in the source graph
                n = todo.pop()
                if n in need or n in full:
                    continue
                need.add(n)
                todo.extend(n.all_input_nodes)
            with graph.inserting_before(user):
                for n in sorted(need, key=order.__getitem__):
                    if n.op == "placeholder":
                        raise LookupError(f"the score term {operand.name} depends on the input {n.name}, "
                                          f"which the decode graph does not have for the cached positions")
                    if n.op == "call_module":
                        raise LookupError(f"the score term {operand.name} depends on {n.name}, an activation")
                    if n.op == "get_attr":
                        full[n] = env[n]
                        continue
                    full[n] = graph.node_copy(n, lambda a: full[a])
                    windows.update(abs(i) for i in _ints((n.args, n.kwargs)))
                term = full[top]
                if axis is not None:                                # the new positions: the last ones
                    n_all = graph.call_function(aten.sym_size.int, (full_ids, 1))
                    n_new = graph.call_function(aten.sym_size.int, (ids, 1))
                    start = graph.call_function(operator.sub, (n_all, n_new))
                    term = graph.call_function(aten.slice.Tensor, (term, axis, start, n_all))
            rows[top] = term
        user.replace_input_with(operand, rows[top])
    return windows


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
    try:
        dec = _build(model)
    except (LookupError, StopIteration, RuntimeError) as exc:
        return None, f"the attention could not be rewritten for a KV cache ({exc})"
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
