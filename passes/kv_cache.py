"""kv_prefill, kv_decode: the instrumented graph rewritten for generation with a
KV cache (the prompt once, then new tokens against cached keys and values).

Match: per block, the attention's QK^T matmul behind `attn.hook_pattern` (the
scores chain: matmul -> scale, masks, soft-cap, hooks -> softmax) and the
pattern@V matmul behind `attn.hook_z`; their key and value operands.
Requires: discover_sites and insert_hooks (the hook_pattern / hook_z sites).

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
`fxlens.runtime.kv_cache.build_decoder` checks prefill and decode logits
against the full graph's (a left-padded row among them) on a probe longer than
every window the model has (the integer constants of its score terms, and the
config's window and chunk sizes), and returns None, with
the reason, when they differ or the rewrite is refused (PassError: what was
found where a score term or a position cannot be carried).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxlens.errors import PassError
from fxlens.ir.graph import MATMUL_OPS, SOFTMAX_OPS, same_size, shape, val
from fxlens.ir.pass_result import PassResult

aten = torch.ops.aten
RESIZE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


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


def attention_chains(graph: fx.Graph, n_layers: int, act: set[fx.Node]):
    """Per block: (layer, the softmax behind hook_pattern, the pattern@V node behind
    hook_z, the scores chain from the softmax input back to QK^T)."""
    names = {s[0] for n in graph.nodes for s in n.meta.get("fxlens.sites", [])}
    for layer in range(n_layers):
        if f"blocks.{layer}.attn.hook_pattern" not in names:
            continue        # an MLP-only block: nothing carried across positions
        softmax = _site(graph, f"blocks.{layer}.attn.hook_pattern")
        z = _site(graph, f"blocks.{layer}.attn.hook_z")
        if softmax.op == "call_function" and softmax.target in SOFTMAX_OPS \
                and softmax.args[1] not in (-1, val(softmax).dim() - 1):
            raise LookupError(f"{softmax.name} normalises over dim {softmax.args[1]}, not the last (keys)")
        yield layer, softmax, z, _scores_chain(softmax, act)


def kv_operands(scores_mm: fx.Node, z: fx.Node) -> tuple:
    """((QK^T node, index of its key operand), (pattern@V node, index of its value operand))."""
    return ((scores_mm, 2 if scores_mm.target is aten.baddbmm.default else 1), (z, 1))


def _returns_tuple(graph: fx.Graph) -> bool:
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    return isinstance(out.args[0], (tuple, list))


def _refused(name: str, exc: Exception) -> PassError:
    return PassError(name, f"the attention could not be rewritten for a KV cache ({exc})")


def kv_prefill(gm: fx.GraphModule, n_layers: int) -> PassResult:
    """The full graph returning, after its logits, every block's key and value operands
    (`kv_operands`, in block order, k then v) at all positions:

        (input_ids, attention_mask=None) -> logits   becomes   -> (logits, k_0, v_0, k_1, ...)

    what kv_decode's graph concatenates its new positions to."""
    try:
        act = _activations(gm.graph)
        kv = [mm.args[i] for _, _, z, chain in attention_chains(gm.graph, n_layers, act)
              for mm, i in kv_operands(chain[-1], z)]
    except (LookupError, StopIteration) as exc:
        raise _refused("kv_prefill", exc) from exc
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    logits = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    out.args = ((logits, *kv),)
    gm.recompile()
    return PassResult("kv_prefill", matched=len(kv) // 2, details={"outputs": 1 + len(kv)})


def kv_decode(gm: fx.GraphModule, n_layers: int, mask_input: str, positions_tag: str) -> PassResult:
    """The decode graph (module docstring), in place of gm's graph:

        (input_ids, attention_mask=None) -> logits   becomes
        (input_ids [new], position_offset, all_input_ids, all_attention_mask, past_0, ...)
            -> (logits [new], cat(past_0, k_0), cat(past_1, v_0), ...)

    `mask_input`: the name of the mask placeholder (no mask placeholder: none is
    taken); `positions_tag`: the `meta["custom"]` key of positions computed from it."""
    try:
        return _decode(gm, n_layers, mask_input, positions_tag)
    except (LookupError, StopIteration) as exc:
        raise _refused("kv_decode", exc) from exc


def _decode(gm: fx.GraphModule, n_layers: int, mask_input: str, positions_tag: str) -> PassResult:
    src = gm.graph                                   # the instrumented graph, rebuilt below
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    logits = graph.graph_copy(src, env)[0] if _returns_tuple(src) else graph.graph_copy(src, env)
    back = {v: k for k, v in env.items()}
    src_ids = next(n for n in src.nodes if n.op == "placeholder")
    src_mask = next((n for n in src.nodes if n.op == "placeholder" and n.target == mask_input), None)
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
    pasts, cats, kv_shapes, terms = [], [], [], []
    for layer, softmax, z, chain in attention_chains(graph, n_layers, act):
        scores_mm = chain[-1]
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
        for mm, i in kv_operands(scores_mm, z):
            x = mm.args[i]
            s = shape(x)
            dim = next(d for d, size in enumerate(s) if same_size(size, seq))
            with graph.inserting_after(last_placeholder):
                past = graph.placeholder(f"past_{layer}_{len(pasts)}")
            last_placeholder = past
            with graph.inserting_before(mm):
                cat = graph.call_function(aten.cat.default, ([past, x], dim))
            # the new keys' value for the cache and the concatenation: which sizes are
            # symbolic (batch, length) and which static, what a compiled segment marks and
            # fuse_attention reads (their length is the cache's, not the new keys')
            if "val" in x.meta:
                past.meta["val"] = cat.meta["val"] = x.meta["val"]
            mm.replace_input_with(x, cat)
            pasts.append(past)
            cats.append(cat)
            kv_shapes.append(["b" if same_size(d, batch) else "s" if same_size(d, seq) else int(d) for d in s])
    # positions computed from the mask (fxlens.capture): computed over every token's mask, as
    # the full graph does (a left-padded row counts its own tokens), and the new columns taken
    for n in [n for n in graph.nodes if n.meta.get("custom", {}).get(positions_tag)]:
        if not any(u.meta.get("custom", {}).get(positions_tag) for u in n.users):
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
    inputs = {p: None for p in src.nodes if p.op == "placeholder" and p in env and env[p] not in present}
    inputs[src_ids] = full_ids
    if src_mask is not None:
        inputs[src_mask] = full_mask
    windows = _carry_terms(graph, src, env, back, terms, inputs, ids, full_ids)
    graph.output((logits, *cats))
    gm.graph = graph                  # the same module: parameters and hook points stay shared
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult("kv_decode", matched=len(pasts) // 2,
                      details={"kv_shapes": kv_shapes, "windows": windows, "takes_mask": src_mask is not None,
                               "score_terms": len(terms)})


def _carry_terms(graph, src: fx.Graph, env, back, terms, inputs, ids, full_ids) -> set[int]:
    """Replace each (user, operand, axis) term by the full graph's computation of it on
    all the tokens so far, sliced on `axis` to the new positions (None: used whole).
    Returns the integer constants of those computations (the window sizes among them)."""
    full: dict[fx.Node, fx.Node] = dict(inputs)     # source node -> its copy over all tokens
    rows: dict[fx.Node, fx.Node] = {}
    windows: set[int] = set()
    order = {n: i for i, n in enumerate(src.nodes)}
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
                    sliced = graph.call_function(aten.slice.Tensor, (term, axis, start, n_all))
                    if "val" in term.meta:        # its dtype and which sizes are symbolic
                        sliced.meta["val"] = term.meta["val"]
                    term = sliced
            rows[top] = term
        user.replace_input_with(operand, rows[top])
    return windows
