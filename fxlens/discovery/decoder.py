"""Site discovery: find the blocks, and in each the attention, MLP and norms,
from module provenance and dataflow only -- no table keyed by architecture.

It changes nothing but `node.meta`: each site node gets
`meta["fxlens.sites"] = [(name, Layout, edge_users)]`, and the model's shape
(n_layers, d_model, n_heads, ...) comes back as a `ModelSpec`. Later passes
(insert_hooks, weight processing, dumps) read those annotations.

How each site is found (shapes: b batch, s pos, h heads, d d_head, m d_model):
  blocks        the ModuleList whose every child owns one attention softmax; where
                each child is the attention itself, the same entry of its sibling
                lists with it (XLM's attentions.i, layer_norm1.i, ffns.i, ...) and
                the parent's residual adds between them
  attn_scores   the softmax's input; pattern = the softmax
  q / k / v     the first [b,s,h,d]-shaped value on the path from a projection
                to the QK^T matmul's operands (q, k) or to the pattern@V matmul
                (v); k and v may carry fewer (kv) heads; q/k's d (the QK^T
                operands' width) may differ from v's. A role no one projection
                gives per head -- put together from several (MLA's key: no-rope
                part up-projected per head, rope part made once, expanded to every
                head and concatenated) -- is the per-head value entering the matmul
  rot_q / rot_k the value entering QK^T when a computation (rotary) sits
                between it and the projection (an assembled k is its own rot_k)
  W_Q/W_K/W_V   none for a role whose projection reads a low-rank latent (MLA's
                q_a -> q_b, kv_a -> kv_b) or that is assembled: the views refuse
  z             the pattern@V product
  attn_out      the attention's output projection, followed through dropout and
                any post-norm to the residual add; mlp_out likewise
  resid_mid     that add, when the MLP reads it (absent for parallel blocks)
  resid_mid2 / extra_out
                a branch joined to the stream after the MLP's add (Gemma 4's
                per-layer-input branch): its output as added is extra_out, the
                stream it joins (resid_mid + mlp_out) resid_mid2
  resid_unscaled
                the stream before a one-element learned gain that ends the block
                (Gemma 4's layer_scalar): resid_post = gain * resid_unscaled
  ln1 / ln2     the norm feeding the attention / MLP projections (a sublayer
                with only a norm after it: that norm; else it is ln1_post / ln2_post)
  mlp pre/post  post = the output projection's input; pre = the nearest
                projection output it is computed from; gated MLPs
                (post = act(gate) * up) add pre_linear = up
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxlens.errors import UnmappableModelError
from fxlens.ir.graph import (HANDLES, MATMUL_OPS, SOFTMAX_OPS, add_handle, ancestors, is_layout,
                             is_scalar_scale, layout_closure, linear_parts, module_path, module_paths,
                             output_node, position_bias, same_size, shape, tensor_inputs, topo_index, val, walk_back)
from fxlens.ir.hook_points import Layout
from fxlens.discovery.names import EXPERT_SITES, block_name
from fxlens.ir.trace import CASTS

aten = torch.ops.aten


@dataclass
class BlockSpec:
    layer: int
    path: str
    attn: str
    mlp: str | None
    ln1: str | None = None
    ln2: str | None = None
    ln1_post: str | None = None
    ln2_post: str | None = None
    parallel: bool = False
    gated: bool = False
    rotary: bool = False
    alibi: bool = False    # a per-position bias added to the scores (BLOOM's ALiBi)
    moe: bool = False
    n_heads: int = 0
    n_kv_heads: int = 0
    d_head: int = 0
    d_mlp: int | None = None
    d_model: int = 0
    # handles of the nodes later passes need (fxlens.ir.graph.site_node looks them up)
    qkv: dict = field(default_factory=dict)           # "q"|"k"|"v" -> (site handle, projection handle)
    # role -> why that projection's columns are not TransformerLens's W_Q/W_K/W_V (MLA:
    # a low-rank latent between the residual stream and it, or k put together from parts)
    qkv_indirect: dict = field(default_factory=dict)
    o_proj: str = ""
    z: str = ""                                       # pattern @ V
    mlp_proj: dict = field(default_factory=dict)      # "pre"|"pre_linear" -> (site handle, projection handle)
    writer: str | None = None                         # the MLP's output projection
    post: str | None = None
    resid_pre: str = ""
    resid_mid: str | None = None
    mlp_in: str | None = None                         # the value the MLP reads ...
    mlp_in_readers: str | None = None                 # ... and its readers inside the MLP (a group)
    # a block whose token mixer computes no attention scores (a state-space or
    # linear-attention layer): the mixer module's path; attn is "" and the attention
    # fields are empty. TransformerLens has no sites inside it (hook_mixer_out: its output)
    mixer: str | None = None

    @property
    def has_attn(self) -> bool:
        return bool(self.z)

    @property
    def has_mlp(self) -> bool:
        return bool(self.mlp_proj) or self.moe


@dataclass
class ModelSpec:
    """The model's shape, and handles (not nodes) of the nodes passes need: a pass
    that changes the graph cannot leave the spec pointing at a node it removed."""
    blocks: list[BlockSpec]
    d_model: int
    d_vocab: int
    norm_kinds: dict            # norm path -> "LN" | "RMS"
    ln_final: str | None
    embed: str | None           # handles: the token embedding lookup
    pos_embed: str | None
    unembed: str | None
    sites: tuple                # the site names discovery found (before hooks are inserted)
    notes: list = field(default_factory=list)
    embed_out: str | None = None   # hook_embed: the embedding after any scale (Gemma's sqrt(d_model))

    @property
    def n_layers(self) -> int:
        return len(self.blocks)


class Sites:
    """Collects annotations (sites and spec handles); only writes node.meta when
    discovery succeeded."""

    def __init__(self):
        self.found: dict[str, tuple[fx.Node, Layout, list | None]] = {}
        self.handles: dict[str, list[fx.Node]] = {}

    def add(self, name: str, node: fx.Node, layout: Layout = Layout(), edge_users=None):
        self.found[name] = (node, layout, edge_users)

    def handle(self, handle: str, *nodes: fx.Node) -> str:
        """Record `handle` on `nodes` (several: a group) and return it, for the spec."""
        self.handles[handle] = list(nodes)
        return handle

    def commit(self, graph: fx.Graph) -> None:
        for n in graph.nodes:
            n.meta.pop("fxlens.sites", None)
            n.meta.pop(HANDLES, None)
        for name, (node, layout, edge) in self.found.items():
            node.meta.setdefault("fxlens.sites", []).append((name, layout, edge))
        for handle, nodes in self.handles.items():
            for node in nodes:
                add_handle(node, handle)


def block_spec(sites: Sites, layer: int, path: str, att: "AttentionSites | None", mlp: "MlpSites | None",
               resid_pre: fx.Node, resid_mid: fx.Node | None, d_model=None, **fields) -> BlockSpec:
    """The BlockSpec of one analysed block, its nodes recorded as handles
    ("blocks.L.attn.o_proj", ...); `fields`: the norms, `parallel`, `mixer`. A
    block without attention (`att` None: a mixer block) or without an MLP leaves
    those fields empty."""
    def h(role, *nodes):
        return sites.handle(block_name(layer, role), *nodes)

    mlp_in = mlp.inputs[0] if mlp is not None and mlp.inputs else None
    readers = [u for u in mlp_in.users if u in mlp.nodes] if mlp_in is not None else []
    attn = {} if att is None else dict(
        attn=att.path, rotary=att.rotary, alibi=att.alibi, n_heads=att.n_heads, n_kv_heads=att.n_kv_heads,
        d_head=att.d_head,
        qkv={r: (h(f"attn.{r}", site), h(f"attn.{r}_proj", proj)) for r, (site, proj) in att.qkv.items()},
        qkv_indirect=dict(att.qkv_indirect), o_proj=h("attn.o_proj", att.o_proj), z=h("attn.z", att.z))
    ff = {} if mlp is None else dict(
        mlp=mlp.path, gated=mlp.gated, moe=mlp.moe, d_mlp=mlp.d_mlp,
        mlp_proj={r: (h(f"mlp.{r}", site), h(f"mlp.{r}_proj", proj)) for r, (site, proj) in mlp.proj.items()},
        writer=h("mlp.out_proj", mlp.writer) if mlp.writer is not None else None,
        post=h("mlp.post", mlp.post) if mlp.post is not None else None)
    return BlockSpec(
        layer=layer, path=path, **{"attn": "", "mlp": None, **attn, **ff},
        d_model=att.d_model if att is not None else d_model,
        resid_pre=h("resid_pre", resid_pre),
        resid_mid=h("resid_mid", resid_mid) if resid_mid is not None else None,
        mlp_in=h("mlp.in", mlp_in) if mlp_in is not None else None,
        mlp_in_readers=h("mlp.in_readers", *readers) if readers else None,
        **fields)


SCOPE = ("fxlens maps decoder-only models whose blocks each hold one token mixer (an eager attention "
         "softmax, or a state-space / linear-attention layer) and at most one MLP, on one residual stream.")


def unmappable(what: str, found: str, missing: str, scope: str = SCOPE) -> UnmappableModelError:
    """The error of a structure discovery cannot map, ending with what fxlens maps (`scope`)."""
    return UnmappableModelError(f"cannot map {what}: found {found}; missing {missing}. {scope}",
                                parts=(what, found, missing))


def _fail(what: str, found: str, missing: str) -> UnmappableModelError:
    return unmappable(what, found, missing)


class ShapedGraph:
    """The graph with the symbols for batch and sequence, and shape predicates."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = gm.graph
        self.order = topo_index(gm.graph)
        ids = next(n for n in self.graph.nodes if n.op == "placeholder")
        self.ids = ids
        self.batch, self.seq = shape(ids)

    def is_resid(self, node, d_model) -> bool:
        s = shape(node)
        return (s is not None and len(s) == 3 and same_size(s[0], self.batch)
                and same_size(s[1], self.seq) and same_size(s[2], d_model))

    def head_layout(self, node, d_head) -> Layout | None:
        """Layout of a per-head value: [b,s,h,d] -> same, [b,h,s,d] -> bhsd."""
        s = shape(node)
        if s is not None and len(s) == 5 and s[3] == 1 and same_size(s[0], self.batch) \
                and same_size(s[1], self.seq) and isinstance(s[2], int) and same_size(s[4], d_head):
            return Layout("squeeze3", s[2], d_head)   # Falcon's grouped k/v: [b, s, kv, 1, d]
        if s is None or len(s) != 4 or not same_size(s[0], self.batch) or not same_size(s[3], d_head):
            return None
        if same_size(s[1], self.seq) and isinstance(s[2], int):
            return Layout("same", s[2], d_head)
        if same_size(s[2], self.seq) and isinstance(s[1], int):
            return Layout("bhsd", s[1], d_head)
        return None

    def heads(self, node, d_head) -> int:
        lay = self.head_layout(node, d_head)
        return lay.heads if lay else 0


def residual_layout(graph: fx.Graph, node: fx.Node, layout: Layout = Layout()) -> Layout:
    """Models that flatten [batch, pos] into one dim (OPT's MLP) get a "tokens" layout."""
    ids = next(n for n in graph.nodes if n.op == "placeholder")
    batch, seq = shape(ids)
    s = shape(node)
    if layout.kind == "same" and s and len(s) == 2 and same_size(s[0], batch * seq):
        return Layout("tokens")
    return layout


def nodes_in(graph: fx.Graph, path: str) -> list[fx.Node]:
    """The nodes module `path` made. A spread layer's path (SPREAD-joined entries):
    its entries' nodes and the lists' parent's own nodes that follow from them
    before the next layer's first node (the residual adds, a padding mask's product)."""
    if SPREAD not in path:
        return [n for n in graph.nodes if path in module_paths(n)]
    members = _members(path)
    home = members[0].rpartition(".")[0].rpartition(".")[0]
    nxt = {f"{m.rpartition('.')[0]}.{int(m.rpartition('.')[2]) + 1}" for m in members}
    inside: set = set()
    for n in graph.nodes:
        paths = module_paths(n)
        if any(m in paths for m in members):
            inside.add(n)
        elif nxt & set(paths):
            break
        elif inside and module_path(n) == home and any(a in inside for a in n.all_input_nodes):
            inside.add(n)
    return [n for n in graph.nodes if n in inside]


def folded_heads(size, batch) -> int:
    """h where `size` is batch * h for a constant h (heads folded into the batch), else 0."""
    if isinstance(size, int) and isinstance(batch, int):
        return size // batch if batch and size % batch == 0 and size > batch else 0
    if not isinstance(size, torch.SymInt) or not isinstance(batch, torch.SymInt):
        return 0
    ratio = size.node.expr / batch.node.expr
    return int(ratio) if ratio.is_Integer and int(ratio) > 1 else 0


def _softmax_heads(g: "ShapedGraph", n: fx.Node) -> int | None:
    """For an attention softmax: its heads if they are folded into the batch
    ([batch*head, query, key] scores, normalised by a bmm layout: XGLM, TrOCR), 0
    for [batch, head, query, key]; None for any other softmax (an MoE router's)."""
    s = shape(n) if n.op == "call_function" and n.target in SOFTMAX_OPS else None
    if not s or not same_size(s[-2], g.seq) or n.args[1] not in (-1, len(s) - 1):
        return None
    if len(s) == 4 and same_size(s[0], g.batch):
        return 0
    if len(s) == 3 and same_size(s[-1], g.seq) and folded_heads(s[0], g.batch):
        return folded_heads(s[0], g.batch)
    return None


def _batch_softmaxes(g: "ShapedGraph", nodes) -> list[fx.Node]:
    """Every softmax over a value of rank 3 or more whose first dimension is the batch
    (attention-like scores of any layout; `_attention_softmaxes` takes the mappable ones)."""
    return [n for n in nodes if n.op == "call_function" and n.target in SOFTMAX_OPS
            and len(shape(n) or ()) >= 3 and same_size(shape(n)[0], g.batch)]


def _attention_softmaxes(g: "ShapedGraph", nodes) -> list[fx.Node]:
    """Softmaxes over [batch, head, query, key] scores, or [batch*head, query, key]
    ones (see `_softmax_heads`); not an MoE router's."""
    return [n for n in nodes if _softmax_heads(g, n) is not None]


# ops that mix positions without attention, named in a refusal
_SEQUENCE_MIXERS = {aten.conv1d.default, aten.convolution.default, aten.cumsum.default,
                    aten.logsumexp.default, aten._log_softmax.default, aten.log_softmax.int}
_FFTS = {aten._fft_r2c.default, aten._fft_c2r.default, aten._fft_c2c.default}


def _no_attention(g: ShapedGraph) -> UnmappableModelError:
    """Why no attention softmax was found: a fused kernel (SDPA), softmaxes over
    other positions than the input's (a prefix the model prepends), or no
    attention at all (positions mixed by convolutions)."""
    sdpa = [n for n in g.graph.nodes if "scaled_dot_product" in str(n.target)]
    if sdpa:
        return _fail("attention", f"{len(sdpa)} fused attention node(s) and no softmax",
                     "an explicit attention softmax (load the model with attn_implementation='eager')")
    soft = _batch_softmaxes(g, g.graph.nodes)
    if soft:
        s = shape(soft[0])
        more = s[-2] - g.seq
        return _fail("attention", f"{len(soft)} softmax node(s) over {list(s)} scores, "
                     f"{s[-2]} queries by {s[-1]} keys where the input has {g.seq} positions "
                     f"(the blocks run on {more} positions more than the input: a prefix the model adds)",
                     "attention over the input's positions")
    mixers = {}
    for n in g.graph.nodes:
        if n.op == "call_function" and n.target in _SEQUENCE_MIXERS \
                and any(part.isdigit() for part in module_path(n).split(".")):   # in a block
            mixers.setdefault(getattr(n.target, "__name__", str(n.target)), module_path(n))
    mixed = (f"; positions are mixed by {', '.join(f'{op} (in {p})' for op, p in mixers.items())}"
             if mixers else "")
    return _fail("attention", f"no softmax and no fused attention node in the graph{mixed}",
                 "an attention softmax node (a recurrent or convolutional model, a softmax computed as "
                 "exp(x - logsumexp(x)), or a config without attention layers)")


def find_blocks(g: ShapedGraph, d_model=None) -> list[tuple[int, str]]:
    """The blocks: the entries of the ModuleList with the most attention softmaxes
    (the shortest path on a tie), every entry the graph runs, with attention or
    not (a hybrid's state-space or linear-attention blocks: `_analyse_mixer_block`
    maps or refuses each). With no attention softmax anywhere, the ModuleList
    whose entries each take and return the [batch, pos, d_model] residual stream
    (a state-space model)."""
    softmaxes = _attention_softmaxes(g, g.graph.nodes)
    entries = _list_entries(g.graph.nodes)
    lists = _list_entries(softmaxes)
    if softmaxes and not lists:
        raise _fail("blocks", f"{len(softmaxes)} softmax node(s) outside any module list",
                    "a ModuleList of blocks")
    if lists:
        parent = min(lists, key=lambda p: (-len(lists[p]), len(p)))
    else:
        def carries_stream(path):
            out = output_node(nodes_in(g.graph, path))
            return out is not None and g.is_resid(out, d_model)

        streams = {p: idxs for p, idxs in entries.items()
                   if d_model is not None and all(carries_stream(f"{p}.{i}") for i in idxs)}
        if not streams:
            raise _no_attention(g)
        parent = min(streams, key=lambda p: (-len(streams[p]), len(p)))
    idxs = sorted(entries.get(parent, ()))
    if not idxs or idxs[0] != 0:
        raise _fail("blocks", f"entries {idxs} of {parent} in the graph", "the block list's first entry")
    lists = _spread_lists(g, parent, entries, softmaxes)
    # an entry between two that ran and made no node is a block the forward skips
    # (Mllama's cross-attention layers without an image): an empty block, see analyse
    return [(i, SPREAD.join(f"{lst}.{i}" for lst in lists)) for i in range(idxs[-1] + 1)]


# A block path made of several module-list entries joined by SPREAD: one layer
# spread over parallel lists (XLM's attentions.i, layer_norm1.i, ffns.i,
# layer_norm2.i), its residual adds made in the lists' parent module
SPREAD = "+"


def _spread_lists(g: ShapedGraph, parent: str, entries: dict, softmaxes: list) -> list[str]:
    """The module lists one layer is spread over: [parent] when each entry of
    `parent` holds its attention as a child (a block module), else -- the entry
    is the attention itself -- `parent` and its sibling lists with the same
    entries, in the order the forward runs them."""
    first = f"{parent}.0"
    own = [n for n in softmaxes if first in module_paths(n)]
    if not own or any(_child(first, n) is not None for n in own):
        return [parent]
    home = parent.rpartition(".")[0]
    order = {}
    for i, n in enumerate(g.graph.nodes):
        for p in module_paths(n):
            order.setdefault(p, i)
    lists = [lst for lst, idxs in entries.items() if idxs == entries[parent] and lst.rpartition(".")[0] == home]
    return sorted(lists, key=lambda lst: order.get(f"{lst}.0", len(order)))


def _members(bpath: str) -> list[str]:
    """The module-list entries a block path names (one, or a spread layer's several)."""
    return bpath.split(SPREAD)


def in_block(path: str, bpath: str) -> bool:
    """Whether module `path` is (inside) one of block `bpath`'s entries."""
    return any(path == m or path.startswith(m + ".") for m in _members(bpath))


def _list_entries(nodes) -> dict[str, set[int]]:
    """ModuleList path -> the indices of its entries (`<path>.<i>`) that made `nodes`."""
    entries: dict[str, set[int]] = {}
    for n in nodes:
        for p in module_paths(n):
            parent, _, idx = p.rpartition(".")
            if idx.isdigit() and parent:
                entries.setdefault(parent, set()).add(int(idx))
    return entries


def norm_paths(graph: fx.Graph) -> dict[str, dict]:
    norms: dict[str, dict] = {}
    for n in graph.nodes:
        part = n.meta.get("fxlens.norm_part")
        if part:
            d = norms.setdefault(n.meta["fxlens.norm"], {"kind": n.meta["fxlens.norm_kind"]})
            d[part] = n
    return norms


def norm_of(node: fx.Node, norms: dict) -> str | None:
    """The norm module that produced `node` (through layout ops), if any."""
    stop = walk_back(node, is_layout)[-1]
    for p in module_paths(stop):
        if p in norms:
            return p
    return None


def _child(path: str, node: fx.Node) -> str | None:
    """The direct child module of `path` that produced `node`; for a spread
    layer's path, the entry that did."""
    if SPREAD in path:
        return next((m for m in _members(path) if m in module_paths(node)), None)
    for p in module_paths(node):
        if p.startswith(path + ".") and "." not in p[len(path) + 1:]:
            return p
    return None


def module_output(graph_nodes_of, node: fx.Node, parent: str | None) -> fx.Node:
    """If `node` was made inside a submodule of `parent`, that submodule's output."""
    p = module_path(node)
    if p and p != parent and (parent is None or p.startswith(parent + ".")):
        out = output_node(graph_nodes_of(p))
        if out is not None:
            return out
    return node


def _to_residual_add(start: fx.Node, block_nodes: set, norms: dict, nodes_of) -> tuple[fx.Node, str | None]:
    """Follow a branch output through dropout, casts and a post-norm up to the
    add that joins it to the residual stream. Returns (branch output, post-norm)."""
    cur, post = start, None
    while True:
        users = list(cur.users)
        # several users, all inside one norm (a post-norm reads its input twice)
        norms_of_users = {next((p for p in module_paths(u) if p in norms), None) for u in users}
        if len(users) > 1 and len(norms_of_users) == 1 and None not in norms_of_users:
            norm = norms_of_users.pop()
            if norm not in module_paths(cur):
                cur, post = output_node(nodes_of(norm)), norm
                continue
        if len(users) != 1 or users[0] not in block_nodes:
            return cur, post
        u = users[0]
        if u.target in _ADDS:
            if not _learned_term(u, cur, _ADDS):
                return cur, post
            cur = u
            continue
        norm = next((p for p in module_paths(u) if p in norms and p not in module_paths(cur)), None)
        if norm is not None:
            cur, post = output_node(nodes_of(norm)), norm
            continue
        if is_layout(u) or is_scalar_scale(u) or _learned_term(u, cur, _MULS):
            cur = u
            continue
        return cur, post


def _learned_term(node: fx.Node, x: fx.Node, ops) -> bool:
    """`x + b` or `x * g` (`node.target` in `ops`) with b / g computed from parameters
    and constants alone (no activation upstream), one element or one per channel of
    `x`: a learned bias or gain on a branch before its residual add (ZAYA's residual
    scaling, (branch + b) * s + (resid + b') * s'; Ergo's residual gate, sigmoid(w) *
    branch), not the residual add itself. What the branch adds to the stream is the
    value after it."""
    if node.target not in ops or len(node.args) != 2 or x not in node.args:
        return False
    g = node.args[1] if node.args[0] is x else node.args[0]
    if not isinstance(g, fx.Node) or val(g) is None or g is x:
        return False
    sg, sx = shape(g), shape(x)
    if sx is None or (val(g).numel() != 1 and not (len(sg) == 1 and same_size(sg[0], sx[-1]))):
        return False
    return not any(n.op == "placeholder" for n in ancestors(g) | {g})


def embedding_output(embed: fx.Node, resid_pre: fx.Node) -> fx.Node:
    """The token embedding as it enters the residual stream (TransformerLens's
    hook_embed, whose W_E folds the scale in): followed through casts and a scalar
    scale such as Gemma's `* sqrt(d_model)`, never past an add (positions)."""
    cur = embed
    while cur is not resid_pre and len(cur.users) == 1:
        u = next(iter(cur.users))
        s, su = shape(cur), shape(u)
        if not (is_scalar_scale(u) or u.target in CASTS) or su is None or len(su) != len(s) \
                or not all(same_size(a, b) for a, b in zip(s, su)):
            break
        cur = u
    return cur


def analyse(gm: fx.GraphModule, get_input_embeddings_path: str | None,
            get_output_embeddings_path: str | None) -> ModelSpec:
    g = ShapedGraph(gm)
    graph = g.graph
    sites = Sites()
    norms = norm_paths(graph)
    cache: dict[str, list[fx.Node]] = {}

    def nodes_of(path: str) -> list[fx.Node]:
        if path not in cache:
            cache[path] = nodes_in(graph, path)
        return cache[path]

    blocks = []
    width = next((shape(n)[-1] for n in graph.nodes if n.target is aten.embedding.default
                  and get_input_embeddings_path in module_paths(n)), None)
    d_model = None
    for layer, bpath in find_blocks(g, width):
        if not nodes_of(bpath):
            b = _skipped_block(sites, layer, bpath, blocks[-1])
        else:
            b = _analyse_block(g, sites, layer, bpath, norms, nodes_of, width)
        blocks.append(b)
        d_model = d_model or b.d_model
    # --- embeddings -------------------------------------------------------
    embed = pos_embed = None
    embeddings = [n for n in graph.nodes if n.target is aten.embedding.default
                  and not any(p.startswith(lst + ".") for lst in
                              (m.rpartition(".")[0] for m in _members(blocks[0].path)) for p in module_paths(n))]
    for n in embeddings:
        if get_input_embeddings_path and get_input_embeddings_path in module_paths(n):
            embed = n
    if embed is None:
        raise _fail("embeddings", f"{len(embeddings)} embedding node(s)",
                    f"the token embedding {get_input_embeddings_path!r}")
    first_in, = sites.handles[blocks[0].resid_pre]
    embed_out = embedding_output(embed, first_in)
    embed_ln = norm_of(first_in, norms)
    if embed_ln is not None and not any(in_block(embed_ln, b.path) for b in blocks) \
            and embed_out in ancestors(norms[embed_ln]["normalized"]):
        # a norm between the token embedding and the first block (BLOOM's): TransformerLens's
        # embed.ln, inside its Embed, so hook_embed is the embedding after it (W_E stays the
        # table before it, as TransformerLens's)
        sites.add("embed.ln.hook_scale", norms[embed_ln]["scale"])
        sites.add("embed.ln.hook_normalized", norms[embed_ln]["normalized"])
        sites.add("hook_embed", first_in)
    else:
        sites.add("hook_embed", embed_out)
    for n in embeddings:
        if n is embed or n not in ancestors(first_in):
            continue
        s = shape(n)
        if s and len(s) == 3 and same_size(s[1], g.seq) and same_size(s[2], d_model):
            pos_embed = n
            lay = Layout("same") if same_size(s[0], g.batch) else Layout("batch")
            sites.add("hook_pos_embed", n, lay)
            break
    # --- unembed and final norm ---------------------------------------------
    unembed = None
    for n in graph.nodes:
        parts = linear_parts(n) if n.op == "call_function" else None
        if parts and get_output_embeddings_path and get_output_embeddings_path in module_paths(n):
            unembed = n
    if unembed is None:
        raise _fail("the unembedding", "no linear in the output embeddings module",
                    f"a linear in {get_output_embeddings_path!r}")
    x_in = linear_parts(unembed)[0]
    ln_final = norm_of(x_in, norms)
    if ln_final is not None and any(in_block(ln_final, b.path) for b in blocks):
        ln_final = None
    if ln_final:
        sites.add("ln_final.hook_scale", norms[ln_final]["scale"])
        sites.add("ln_final.hook_normalized", norms[ln_final]["normalized"])
    sites.add("unembed.hook_in", walk_back(x_in, is_layout)[-1] if shape(x_in) and len(shape(x_in)) != 3 else x_in)
    sites.add("unembed.hook_out", module_output(nodes_of, unembed, ""))
    d_vocab = shape(unembed)[-1]
    for site, (node, layout, edge) in list(sites.found.items()):
        if not site.endswith(_TOKEN_ROWS):
            sites.found[site] = (node, residual_layout(gm.graph, node, layout), edge)
    spec = ModelSpec(blocks=blocks, d_model=int(d_model), d_vocab=int(d_vocab),
                     norm_kinds={p: d["kind"] for p, d in norms.items()}, ln_final=ln_final,
                     embed=sites.handle("embed", embed), embed_out=sites.handle("embed_out", embed_out),
                     pos_embed=sites.handle("pos_embed", pos_embed) if pos_embed is not None else None,
                     unembed=sites.handle("unembed", unembed), sites=tuple(sites.found))
    sites.commit(graph)
    return spec


@dataclass
class AttentionSites:
    """One block's attention as `analyse_attention` found it."""
    path: str                       # the block's child module that owns the softmax
    nodes: set
    softmax: fx.Node
    z: fx.Node                      # pattern @ V
    projections: list               # linears feeding q/k/v
    qkv: dict                       # "q"|"k"|"v" -> (site node, projection)
    qkv_indirect: dict              # role -> why its projection's columns are no W_Q/W_K/W_V
    o_proj: fx.Node
    out: fx.Node                    # the branch output that joins the residual (attn_out)
    post_norm: str | None           # a norm between the output projection and that add
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    rotary: bool
    alibi: bool


@dataclass
class MlpSites:
    """One block's MLP as `analyse_mlp` found it."""
    path: str | None                # None when the MLP is loose linears in the block (OPT)
    nodes: set
    out: fx.Node                    # the branch output that joins the residual (mlp_out)
    post_norm: str | None
    inputs: list                    # the values the MLP reads
    proj: dict                      # "pre"|"pre_linear" -> (site node, projection)
    writer: fx.Node | None          # the output projection (None for routed experts)
    post: fx.Node | None
    d_mlp: int | None
    gated: bool
    moe: bool


def _is_product(n: fx.Node) -> bool:
    """A matmul (matmul, bmm, baddbmm), or an einsum of two tensors."""
    if n.op != "call_function":
        return False
    if n.target is aten.einsum.default:
        return len(n.args[1]) == 2 and all(isinstance(a, fx.Node) for a in n.args[1])
    return n.target in MATMUL_OPS


def _operands(product: fx.Node) -> tuple:
    """The two multiplied operands of a `_is_product` node (baddbmm: not the bias)."""
    if product.target is aten.einsum.default:
        return tuple(product.args[1])
    return tuple(product.args[1:3] if product.target is aten.baddbmm.default else product.args[:2])


def _describe(n: fx.Node) -> str:
    eq = f" {n.args[0]!r}" if n.target is aten.einsum.default else ""
    return f"{n.name} ({getattr(n.target, '__name__', n.target)}{eq}, {list(shape(n) or ())})"


def _around(softmax: fx.Node, aset: set) -> str:
    """What computes a softmax's input and what reads its output, for a refusal."""
    back = walk_back(softmax.args[0], lambda n: is_layout(n) or is_scalar_scale(n) or n.target in CASTS)[-1]
    fwd = [u for n in layout_closure(softmax) for u in n.users if not is_layout(u) and u in aset]
    return f"scores from {_describe(back)} and the pattern read by {[_describe(u) for u in fwd] or 'nothing'}"


def _carries_values(n: fx.Node) -> bool:
    """Whether a node's value is floating point (or a tuple holding one): what a
    score term is made of, unlike indices and masks."""
    val = n.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    return any(not isinstance(v, torch.Tensor) or v.dtype.is_floating_point for v in vals)


def _single_stream(g: ShapedGraph, attn: str, aset: set, softmax, scores, scores_mm, z_mm) -> None:
    """Refuse an attention whose scores or pattern TransformerLens's one stream of
    QK^T -> softmax -> pattern@V does not hold: another softmax over per-position
    scores in it (ProphetNet's n-gram stream), or a second product of the queries
    added to QK^T (Transformer-XL / XLNet's relative-position term). A product
    that reaches the scores only through integer or boolean values (top-k
    indices scattered into a mask, a comparison) chooses which keys are masked
    and adds nothing to them: DeepSeek-V3.2's sparse-attention indexer is such
    a mask, kept as part of the attention mask."""
    others = [n for n in _batch_softmaxes(g, aset) if n is not softmax]
    if others:
        raise _fail(f"attention {attn}", f"the attention softmax {_describe(softmax)} and {len(others)} more "
                    f"({', '.join(_describe(n) for n in others)}): another attention stream",
                    "one softmax per attention (TransformerLens's hook_pattern has one stream)")
    q_op = _operands(scores_mm)[0]
    q_anc = ancestors(q_op, lambda n: n in aset) | {q_op}
    between = ancestors(scores, lambda n: n in aset and n is not scores_mm and _carries_values(n)) | {scores}
    extra = [n for n in between if n is not scores_mm and _is_product(n) and scores_mm not in ancestors(n)
             and any(a in q_anc or (ancestors(a) & q_anc) for a in _operands(n))]
    if extra:
        raise _fail(f"attention {attn}", f"QK^T {_describe(scores_mm)} plus a second product of the queries "
                    f"added to the scores ({', '.join(_describe(n) for n in extra)}: a relative-position term)",
                    "scores that are QK^T alone (plus a bias that does not read the queries)")


def _sibling_entries(g: ShapedGraph, entry: str) -> str:
    """`entry` (a.b.attentions.3) and the same index in its parent's other module
    lists (a.b.ffns.3, ...): a layer spread over parallel lists (XLM's)."""
    lst, _, idx = entry.rpartition(".")
    parent = lst.rpartition(".")[0]
    depth = entry.count(".")
    seen = dict.fromkeys(p for n in g.graph.nodes for p in module_paths(n)
                         if p.count(".") == depth and p.endswith("." + idx) and p != entry
                         and p.startswith(parent + "." if parent else ""))
    return f", its layer spread over parallel module lists ({', '.join([entry, *seen])})" if seen else ""


def analyse_attention(g: ShapedGraph, sites: Sites, layer: int, bpath: str, norms: dict, nodes_of) -> AttentionSites:
    """The attention sites of block `bpath`, wherever its norms sit: attn_scores,
    pattern, z, q/k/v (rot_q/rot_k) and attn_out."""
    name = lambda short: block_name(layer, short)  # noqa: E731
    bnodes = nodes_of(bpath)
    bset = set(bnodes)
    softmax = _attention_softmaxes(g, bnodes)
    if len(softmax) != 1:
        raise _several_softmaxes(g, bpath, softmax, bset)
    softmax = softmax[0]
    attn = _child(bpath, softmax)
    if attn is None:
        raise _fail(f"block {bpath}", f"the attention softmax in {bpath} itself, the module-list entry"
                    f"{_sibling_entries(g, bpath)}", "a block module holding the layer's attention and MLP")
    anodes = nodes_of(attn)
    aset = set(anodes)
    inside = lambda n: n in aset  # noqa: E731

    # --- attention core: scores -> softmax -> pattern @ v ---------------------
    scores = softmax.args[0]
    scores_mm = _nearest(scores, aset, _is_product, back=True)
    z_mm = _nearest(softmax, aset, _is_product, back=False)
    if scores_mm is None or z_mm is None:
        raise _fail(f"attention {attn}", f"a softmax ({softmax.name}) with {_around(softmax, aset)}",
                    "the QK^T and pattern@V products around it")
    _single_stream(g, attn, aset, softmax, scores, scores_mm, z_mm)
    q_op, k_op = _operands(scores_mm)
    v_op = _operands(z_mm)[1]
    d_head = shape(z_mm)[-1]
    if not g.heads(z_mm, d_head):
        # heads folded into the batch for a bmm (BLOOM: [batch * head, pos, d_head]):
        # z is the product once layout ops unfold it into [batch, (head, pos | pos, head), d_head]
        unfolded = [n for n in layout_closure(z_mm) if g.head_layout(n, d_head)]
        if unfolded:
            z_mm = min(unfolded, key=g.order.__getitem__)
    n_heads = g.heads(z_mm, d_head)
    if not n_heads:
        raise _fail(f"attention {attn}", f"pattern@V of shape {shape(z_mm)}", "a [batch, head, pos, d_head] product")
    folded = _softmax_heads(g, softmax)
    if folded:
        # heads folded into the batch ([batch*head, query, key]): the scores are
        # the [batch, head, query, key] value behind the bmm layout where there is one
        # (the mask added after a view), and both show TransformerLens's layout
        shaped = [n for n in walk_back(scores, is_layout) if len(shape(n) or ()) == 4
                  and same_size(shape(n)[0], g.batch) and shape(n)[1] == folded]
        if shaped:
            sites.add(name("attn.hook_attn_scores"), shaped[0], Layout("scores"))
        else:
            sites.add(name("attn.hook_attn_scores"), scores, Layout("folded_scores", folded))
        sites.add(name("attn.hook_pattern"), softmax, Layout("folded", folded))
    else:
        sites.add(name("attn.hook_attn_scores"), scores, Layout("scores"))
        sites.add(name("attn.hook_pattern"), softmax)
    sites.add(name("attn.hook_z"), z_mm, g.head_layout(z_mm, d_head))

    # --- projections and q/k/v -------------------------------------------------
    after_softmax = {softmax} | _descendants(softmax, aset)
    projs = [n for n in anodes if linear_parts(n) and n not in after_softmax]
    closure = {}
    for p in projs:
        for n in layout_closure(module_output(nodes_of, p, attn)):
            closure[n] = p
        closure[p] = p
    anc = {r: ancestors(op, inside) | {op} for r, op in (("q", q_op), ("k", k_op), ("v", v_op))}
    # q and k share a head width, which may differ from v's (MLA: nope + rope dims vs v_head_dim)
    d_qk = shape(q_op)[-1]
    width = {"q": d_qk, "k": d_qk, "v": d_head}
    chosen = {}
    assembled = set()
    indirect = {}    # role -> why its projection's columns are not TransformerLens weights
    for role, others in (("q", "kv"), ("k", "qv"), ("v", "qk")):
        excl = set().union(*(anc[o] for o in others))
        dr = width[role]
        cands = [n for n in closure if n in anc[role] and n not in excl and g.head_layout(n, dr)]
        if cands:
            node = min(cands, key=g.order.__getitem__)
            chosen[role] = (node, g.head_layout(node, dr), closure[node])
            continue
        flat = [module_output(nodes_of, p, attn) for p in projs]
        flat = [n for n in flat if n in anc[role] and n not in excl]
        if len(flat) == 1 and shape(flat[0])[-1] % dr == 0:
            h = shape(flat[0])[-1] // dr
            chosen[role] = (flat[0], Layout("flat", h, dr), closure[flat[0]])
            continue
        router = next((n for n in g.order if n in anc[role] and n not in excl and n.target is aten.topk.default),
                      None)
        if router is not None:
            # JetMoE's mixture of attention heads: each token's query comes from the
            # experts a router picks, no one projection TransformerLens's W_Q could be
            raise _fail(f"attention {attn}", f"the {role} value computed by routed attention experts (a topk "
                        f"router, {router.name}, picks each token's {role} projection: mixture of attention heads)",
                        f"a {role} projection shared by every token")
        found = _assembled_operand(g, (q_op, k_op, v_op)["qkv".index(role)], dr, projs, inside)
        if found is not None:
            # no one projection gives this role per head: it is put together from
            # several (MLA's key: the up-projected no-rope part and a rope part shared
            # by all heads, expanded and concatenated). The site is the per-head value
            # entering the matmul, every head's copy of a shared part included.
            node, sources = found
            chosen[role] = (node, g.head_layout(node, dr), sources[-1])
            assembled.add(role)
            indirect[role] = (f"{role} is assembled in {node.name} from several projections "
                              f"({', '.join(dict.fromkeys(module_path(s) or s.name for s in sources))}), not read from one")
            continue
        src = {r: op for r, op in (("q", q_op), ("k", k_op), ("v", v_op))}[role]
        outside = [i for n in anc[role] | {src} for i in n.all_input_nodes
                   if i not in aset and g.head_layout(i, dr)]
        if outside:
            # Gemma 4's KV sharing: a later layer attends over an earlier layer's k/v
            where = module_path(outside[0]) or "the model"
            raise _fail(f"attention {attn}", f"the {role} value per head computed outside this attention "
                        f"({outside[0].name}, in {where}): {role} states shared across layers",
                        f"a {role} projection of this attention's own")
        raise _fail(f"attention {attn}", f"{len(projs)} projection(s)", f"the {role} value per head")
    for role in "qkv":
        sites.add(name(f"attn.hook_{role}"), *chosen[role][:2])
        proj = chosen[role][2]
        if role not in indirect:
            # a projection fed by another one (MLA's low-rank q_a -> q_b, kv_a -> kv_b):
            # its weights act on a latent, not on the residual stream
            x = walk_back(linear_parts(proj)[0], is_layout)[-1]
            earlier = [p for p in projs if p is not proj and p in (ancestors(x, inside) | {x})]
            if earlier:
                indirect[role] = (f"the {role} projection {module_path(proj) or proj.name} reads a low-rank latent made by "
                                  f"{', '.join(module_path(p) or p.name for p in earlier)}, not the residual stream")
    qkv = {role: (chosen[role][0], chosen[role][2]) for role in "qkv"}
    n_kv = chosen["k"][1].heads

    # ALiBi: QK^T added (baddbmm) to a bias made from positions alone, no embedding upstream
    alibi = position_bias(scores_mm) is not None

    # rotary: a computation between the projection and QK^T
    rotary = False
    for role, op in (("q", q_op), ("k", k_op)):
        chain = walk_back(op, lambda n: is_layout(n) or is_scalar_scale(n))
        stop = chain[-1]
        if stop in closure or (stop is chosen[role][0] and role not in assembled):
            continue
        if role in assembled and not rotary:
            continue    # put together from parts, none of them rotated (q was not)
        rot = next((n for n in reversed(chain) if g.head_layout(n, d_qk)), None)
        if rot is None:
            raise _fail(f"attention {attn}", f"a computation on {role} ({stop.name})", f"a per-head rotated {role}")
        lay = g.head_layout(rot, d_qk)
        want = chosen[role][1].heads
        if lay.heads != want and lay.heads % want == 0:
            # rotary applied after k was repeated to every query head: show each kv head once
            lay = Layout(lay.kind, want, d_head, group=lay.heads // want)
        sites.add(name(f"attn.hook_rot_{role}"), rot, lay)
        rotary = True

    # q/k/v norms inside the attention (Qwen3, Gemma 3 per head; OLMo 2 over [b, s, h*d];
    # Gemma 4's weightless v norm): a norm on the path of exactly one of q, k, v
    for path, norm in norms.items():
        if not path.startswith(attn + "."):
            continue
        on = [role for role in "qkv" if norm["normalized"] in anc[role]]
        if len(on) != 1:
            continue
        role = on[0]
        if qkv[role][1] not in ancestors(norm["normalized"]):
            continue    # a norm before the role's projection (MLA's q_a / kv_a latent norms): no q/k norm
        per_head = g.head_layout(norm["normalized"], width[role])
        if per_head is not None and per_head.kind in ("same", "bhsd"):
            # TransformerLens normalises the [b*s*h, d_head] rows
            lay = Layout("rows" if per_head.kind == "same" else "bhsd_rows")
        elif g.is_resid(norm["normalized"], shape(norm["normalized"])[-1]):
            lay = Layout()
        else:
            continue
        sites.add(name(f"attn.{role}_norm.hook_scale"), norm["scale"], lay)
        sites.add(name(f"attn.{role}_norm.hook_normalized"), norm["normalized"], lay)

    # --- output projection, attn_out ---------------------------------------------
    o_proj = _nearest(z_mm, aset, lambda n: linear_parts(n) is not None, back=False)
    if o_proj is None:
        raise _fail(f"attention {attn}", "pattern@V", "an output projection")
    attn_out, ln1_post = _to_residual_add(module_output(nodes_of, o_proj, attn), bset, norms, nodes_of)
    d_model = shape(attn_out)[-1]
    if not g.is_resid(attn_out, d_model):
        raise _fail(f"attention {attn}", f"output of shape {shape(attn_out)}", "a [batch, pos, d_model] output")
    return AttentionSites(path=attn, nodes=aset, softmax=softmax, z=z_mm, projections=projs, qkv=qkv,
                          qkv_indirect=indirect,
                          o_proj=o_proj, out=attn_out, post_norm=ln1_post, n_heads=n_heads,
                          n_kv_heads=n_kv, d_head=d_head, d_model=d_model, rotary=rotary,
                          alibi=alibi)


def module_call(node: fx.Node, path: str) -> str | None:
    """Which call of module `path` made `node`: torch.export keys the nn_module_stack
    entry of a module's second call '<key>@1', its third '<key>@2', ..."""
    stack = node.meta.get("nn_module_stack") or {}
    return next((k for k, v in stack.items() if v[0] == path), None)


def _several_softmaxes(g: ShapedGraph, bpath: str, softmaxes: list, bset: set) -> UnmappableModelError:
    """The refusal of a block holding more than one attention softmax, naming the
    structure found from provenance and dataflow."""
    calls = list(dict.fromkeys(module_call(n, bpath) for n in softmaxes))
    if len(calls) > 1:
        # Dory, HRM: a recurrent section runs the same layers several times per forward
        return _fail(f"block {bpath}", f"{len(softmaxes)} attention softmax nodes made by {len(calls)} calls of the "
                     f"block module: a recurrent section reusing its layers",
                     "one call per block (TransformerLens's blocks each run once per forward)")
    if len(softmaxes) == 2:
        zs = [_nearest(sm, bset, lambda n: n.target in MATMUL_OPS, back=False) for sm in softmaxes]
        if all(z is not None for z in zs):
            common = (_descendants(zs[0], bset) | {zs[0]}) & (_descendants(zs[1], bset) | {zs[1]})
            sub = next((n for n in g.order if n in common and n.target is aten.sub.Tensor), None)
            if sub is not None:
                # DiffLlama: (softmax_1 - lambda * softmax_2) @ V, head pair by head pair
                return _fail(f"block {bpath}", f"2 attention softmax nodes ({softmaxes[0].name}, "
                             f"{softmaxes[1].name}) whose pattern@V products are combined by a subtraction "
                             f"({sub.name}): differential attention, p1 - lambda * p2",
                             "one softmax pattern per head (TransformerLens has no site for the second)")
    return _fail(f"block {bpath}", f"{len(softmaxes)} attention softmax nodes", "exactly one")


def block_input(g: ShapedGraph, bpath: str, bnodes: list, d_model) -> fx.Node:
    """The residual stream entering block `bpath` (hook_resid_pre)."""
    bset = set(bnodes)
    ins = [a for n in bnodes for a in n.all_input_nodes if a not in bset and g.is_resid(a, d_model)]
    ins = list(dict.fromkeys(ins))
    if len(ins) != 1:
        raise _fail(f"block {bpath}", f"{len(ins)} residual inputs", "exactly one")
    return ins[0]


def analyse_mlp(g: ShapedGraph, sites: Sites, layer: int, bpath: str, attn: "AttentionSites | _Sublayer",
                norms: dict, nodes_of) -> MlpSites:
    """The MLP sites of block `bpath`: mlp.hook_pre / pre_linear / post, and the
    branch output that joins the residual stream (mlp_out). `attn`: the token
    mixer the MLP follows (an attention, or a mixer block's `_Sublayer`)."""
    name = lambda short: block_name(layer, short)  # noqa: E731
    bnodes = nodes_of(bpath)
    bset = set(bnodes)
    children = {}
    for n in bnodes:
        c = _child(bpath, n)
        if c and c != attn.path and c not in norms and linear_parts(n):
            children.setdefault(c, []).append(n)
    if not children:
        raise _fail(f"block {bpath}", "no linear outside the attention", "an MLP")
    attn_add = _resid_add(attn.out) if attn.out is not None else None
    nxt = _next_resid_add(g, attn_add, bset, attn.d_model) if attn_add is not None else None
    if len(children) > 1 and nxt is not None:
        # a branch after the MLP's residual add (Gemma 4's per-layer-input branch) is
        # not the MLP: keep the children read between the attention's add and the next
        later = _descendants(nxt, bset) | {nxt}
        children = {c: ns for c, ns in children.items() if not all(n in later for n in ns)} or children
    if len(children) == 1:
        mlp = next(iter(children))
        mnodes = nodes_of(mlp)
    else:
        # the MLP is not one module (OPT: fc1, act, fc2 sit in the block itself)
        mlp = None
        mnodes = _branch_nodes([n for ns in children.values() for n in ns], bset - attn.nodes, norms)
    mset = set(mnodes)
    mlp_out_raw = output_node(mnodes)
    if mlp_out_raw.target is aten.add.Tensor:
        # the residual joins inside the MLP module (BLOOM's dropout_add(out, residual)):
        # the branch is the summand made inside it
        inner = [a for a in mlp_out_raw.all_input_nodes if a in mset]
        outer = [a for a in mlp_out_raw.all_input_nodes if a not in mset and g.is_resid(a, attn.d_model)]
        if len(inner) == 1 and len(outer) == 1:
            mlp_out_raw = inner[0]
    mlp_out, ln2_post = _to_residual_add(mlp_out_raw, bset, norms, nodes_of)
    reading = [n for n in mnodes if linear_parts(n) and walk_back(linear_parts(n)[0], is_layout)[-1] not in mset]
    moe = False
    gated = False
    d_mlp = None
    post = None
    mlp_proj = {}
    writer = walk_back(mlp_out_raw, is_layout)[-1]
    if linear_parts(writer) is None or not reading:
        moe = True  # routed experts: branch sites only, no single pre/post
        _router_sites(sites, name, mnodes)
        experts = _expert_sites(sites, name, mnodes)
        if experts is not None:
            d_mlp, gated = experts, True
    else:
        post = walk_back(linear_parts(writer)[0], is_layout)[-1]
        mclosure = {}
        for r in reading:
            mclosure.update({n: r for n in layout_closure(module_output(nodes_of, r, mlp))})
            mclosure[r] = r
        ins2 = [a for a in post.all_input_nodes if val(a) is not None]
        if post.target is aten.mul.Tensor and len(ins2) == 2:
            direct = [a for a in ins2 if walk_back(a, is_layout)[-1] in mclosure or a in mclosure]
            if len(direct) == 1:
                gated = True
                up = direct[0]
                gate_side = ins2[1 - ins2.index(up)]
                pre = _nearest_in(gate_side, mclosure, g)
                sites.add(name("mlp.hook_pre_linear"), up)
                up_src = up if up in mclosure else walk_back(up, is_layout)[-1]
                mlp_proj["pre_linear"] = (up, mclosure[up_src])
        if not gated:
            pre = _nearest_in(post, mclosure, g)
        if pre is None:
            raise _fail(f"MLP {mlp}", f"post activation {post.name}", "the projection it is computed from")
        sites.add(name("mlp.hook_pre"), pre)
        sites.add(name("mlp.hook_post"), post)
        mlp_proj["pre"] = (pre, mclosure[pre])
        d_mlp = shape(post)[-1]
    mlp_inputs = [linear_parts(r)[0] for r in reading] or \
        [a for n in mnodes for a in n.all_input_nodes if a not in mset and g.is_resid(a, attn.d_model)]
    return MlpSites(path=mlp, nodes=mset, out=mlp_out, post_norm=ln2_post, inputs=mlp_inputs,
                    proj=mlp_proj, writer=None if moe else writer, post=post, d_mlp=d_mlp,
                    gated=gated, moe=moe)


# TransformerLens keeps the router's sites as [batch*pos, ...] rows
_TOKEN_ROWS = ("mlp.hook_expert_weights", "mlp.hook_expert_indices")


def _router_sites(sites: Sites, name, mnodes: list) -> None:
    """An MoE router: a softmax over a linear's [tokens, experts] logits whose
    probabilities pick the experts by topk. TransformerLens's mlp.hook_expert_weights
    is that full softmax, mlp.hook_expert_indices the chosen experts [tokens, k]."""
    for sm in mnodes:
        if sm.op != "call_function" or sm.target not in SOFTMAX_OPS or shape(sm) is None or len(shape(sm)) != 2:
            continue
        logits = walk_back(sm.args[0], lambda n: n.target in CASTS)[-1]
        topk = [u for u in sm.users if u.target is aten.topk.default]
        if linear_parts(logits) is None or len(topk) != 1:
            continue
        indices = [u for u in topk[0].users if u.target is operator.getitem and u.args[1] == 1]
        if len(indices) != 1:
            continue
        sites.add(name("mlp.hook_expert_weights"), sm)
        sites.add(name("mlp.hook_expert_indices"), indices[0])
        return


# TransformerLens's sites of each routed expert (MoEGatedMLP), EXPERT_SITES: hook_gate
# = the gate projection (before the activation), hook_pre = the linear one (up),
# hook_post = act(gate) * up


def _expert_sites(sites: Sites, name, mnodes: list) -> int | None:
    """Each routed expert's mlp.experts.E.* sites, where the experts run together on
    the (token, slot) pairs sorted by expert (a grouped matmul over a [E, ...] weight):
    the router's topk indices [tokens, k] over [tokens, E] scores are flattened and
    sorted (values: each pair's expert, indices: its flat token*k + slot), the
    hidden rows gathered by flat // k, projected, and post = act(gate) * up on those
    rows. The sites hold all pairs' rows; Layout "expert" shows expert E's in
    TransformerLens's order (`expert_rows`), from the routing the HookPoint reads as
    its second input (`meta["fxlens.routing"]` = (sorted ids, flat indices) on the
    site nodes). Returns d_mlp, or None where no such structure is found (no
    per-expert sites: experts that are not gated, or not run on sorted pairs)."""
    for topk in mnodes:
        if topk.target is not aten.topk.default or shape(topk.args[0]) is None:
            continue
        indices = [u for u in topk.users if u.target is operator.getitem and u.args[1] == 1]
        if len(indices) != 1:
            continue
        d_mlp = _sorted_expert_sites(sites, name, mnodes, indices[0], shape(topk.args[0])[-1])
        if d_mlp is not None:
            return d_mlp
    return None


def _sorted_expert_sites(sites: Sites, name, mnodes: list, indices: fx.Node, n_experts: int) -> int | None:
    k = shape(indices)[-1]
    sort = next((u for n in layout_closure(indices) for u in n.users if u.target is aten.sort.default), None)
    if sort is None:
        return None
    got = {u.args[1]: u for u in sort.users if u.target is operator.getitem}
    if set(got) != {0, 1}:
        return None
    ids, flat = got[0], got[1]
    pairs = shape(ids)[0]
    gathered = {u for d in flat.users if d.target is aten.floor_divide.default and d.args[1] == k
                for u in d.users if u.target is aten.index.Tensor}
    if not gathered:
        return None

    def rows(n):
        return val(n) is not None and val(n).dim() == 2 and same_size(shape(n)[0], pairs)

    def producer(n):     # back through layout ops, a chunk's getitem included
        while is_layout(n) and isinstance(n.args[0], fx.Node):
            n = n.args[0]
        return n

    for post in mnodes:
        if post.target is not aten.mul.Tensor or not rows(post):
            continue
        ins = [a for a in post.args if isinstance(a, fx.Node) and rows(a)]
        if len(ins) != 2:
            continue
        for act, up in (ins, ins[::-1]):
            if is_layout(act) or len(tensor_inputs(act)) != 1:
                continue
            gate = tensor_inputs(act)[0]
            proj = producer(gate)
            if producer(up) is not proj or proj is gate or not rows(gate) \
                    or not gathered & (ancestors(proj) | {proj}):
                continue
            for n in (gate, up, post):
                n.meta["fxlens.routing"] = (ids, flat)
            for e in range(n_experts):
                for short, node in zip(EXPERT_SITES, (gate, up, post)):
                    sites.add(name(f"mlp.experts.{e}.{short}"), node, Layout("expert", expert=e, top_k=k))
            return shape(post)[-1]
    return None


def _analyse_block(g: ShapedGraph, sites: Sites, layer: int, bpath: str, norms: dict, nodes_of,
                   width=None) -> BlockSpec:
    name = lambda short: block_name(layer, short)  # noqa: E731
    bnodes = nodes_of(bpath)
    bset = set(bnodes)
    if width is not None and not any(n.op == "call_function" and n.target in SOFTMAX_OPS
                                     and len(shape(n) or ()) >= 3 for n in bnodes):
        # no softmax over scores of any layout (an MoE router's is [tokens, experts])
        return _analyse_mixer_block(g, sites, layer, bpath, norms, nodes_of, width)
    out = output_node(bnodes)
    streams = _streams_per_position(g, out)
    if streams:
        # several residual streams per position, mixed into each sublayer's input and
        # out of its output by learned weights (DeepSeek-V4's hyper-connections:
        # [b, s, n, d]; Gemma 3n's AltUp: [n, b, s, d] predictions, one of them active)
        raise _fail(f"block {bpath}", f"a block output of shape {list(shape(out))}: {streams} residual streams "
                    f"per position (the block takes and returns all {streams})",
                    "one [batch, pos, d_model] residual stream (TransformerLens's hook_resid_pre/post)")
    mixed = _stack_mixture(g, bnodes, bset)
    if mixed is not None:
        sm, stack = mixed
        n = shape(stack)[-2]
        raise _fail(f"block {bpath}", f"block attention residuals: a softmax ({sm.name}, {list(shape(sm))}) "
                    f"weighting the {n} states of a stacked {list(shape(stack))} value ({stack.name}, states "
                    f"concatenated along dim 2) into a sublayer input: a learned mixture of earlier blocks' outputs",
                    "a residual stream carried from block to block (TransformerLens's "
                    "resid_post = resid_pre + attn_out + mlp_out)")
    att = analyse_attention(g, sites, layer, bpath, norms, nodes_of)
    attn_out, d_model = att.out, att.d_model

    # --- residual stream ---------------------------------------------------------
    resid_pre = block_input(g, bpath, bnodes, d_model)
    resid_post = output_node(bnodes)
    if resid_post is None or not g.is_resid(resid_post, d_model):
        raise _fail(f"block {bpath}", f"output {shape(resid_post) if resid_post else None}", "a residual output")

    if not any(linear_parts(n) for n in bnodes if n not in att.nodes and norm_of(n, norms) is None):
        # an attention-only block of a hybrid (Nemotron-H's: its MLPs are blocks of their own)
        if _scaled_source(resid_post) is not _resid_add(attn_out):
            raise _fail(f"block {bpath}", "no linear outside the attention", "an MLP")
        ln1 = next((nm for nm in (norm_of(_unmasked(g, linear_parts(p)[0]), norms) for p in att.projections)
                    if nm), None)
        if ln1:
            sites.add(name("ln1.hook_scale"), norms[ln1]["scale"])
            sites.add(name("ln1.hook_normalized"), norms[ln1]["normalized"])
        sites.add(name("hook_resid_pre"), resid_pre)
        sites.add(name("hook_attn_out"), attn_out)
        sites.add(name("hook_resid_post"), resid_post)
        return block_spec(sites, layer, bpath, att, None, resid_pre, None, ln1=ln1, ln1_post=att.post_norm)
    mlp = analyse_mlp(g, sites, layer, bpath, att, norms, nodes_of)

    # --- norms feeding attention and MLP ---------------------------------------------
    ln1 = next((nm for nm in (norm_of(_unmasked(g, linear_parts(p)[0]), norms) for p in att.projections) if nm),
               None)
    ln2 = next((nm for nm in (norm_of(x, norms) for x in mlp.inputs) if nm), None)
    if ln2 == ln1:
        ln2 = None
    # a sublayer normalised only after it (OLMo 2) names that norm ln1 / ln2, as
    # TransformerLens does; with a norm on both sides (Gemma 2) the later one is ln*_post
    post1 = "ln1_post" if ln1 else "ln1"
    post2 = "ln2_post" if ln2 else "ln2"
    for tag, norm in (("ln1", ln1), (post1, att.post_norm), ("ln2", ln2), (post2, mlp.post_norm)):
        if norm:
            sites.add(name(f"{tag}.hook_scale"), norms[norm]["scale"])
            sites.add(name(f"{tag}.hook_normalized"), norms[norm]["normalized"])

    # sequential blocks: the MLP reads resid_mid = resid_pre + attn_out
    resid_add = _resid_add(attn_out)
    if resid_add is None:
        raise _fail(f"block {bpath}", f"attention output {attn_out.name} used by {list(attn_out.users)}",
                    "the add that joins it to the residual stream")
    mlp_anc = set()
    for x in mlp.inputs:
        mlp_anc |= ancestors(x, lambda n: n in bset) | {x}
    parallel = resid_add not in mlp_anc
    sites.add(name("hook_resid_pre"), resid_pre)
    sites.add(name("hook_attn_out"), attn_out)
    if not parallel:
        sites.add(name("hook_resid_mid"), resid_add)
    sites.add(name("hook_mlp_out"), mlp.out)
    if not parallel:
        # Gemma 4: a per-layer-input branch after the MLP and a learned gain on the whole
        # stream; resid_post = gain * (resid_mid2 + extra_out), resid_mid2 = resid_mid + mlp_out
        # (a parallel block's adds -- attn_out + mlp_out + resid_pre -- are left as they are)
        mlp_add = _resid_add(mlp.out)
        other = [a for a in mlp_add.all_input_nodes if a is not mlp.out] if mlp_add is not None else []
        if len(other) != 1 or not _is_stream_of(other[0], resid_add, norms):
            # Gemma 4's MoE block sums a dense MLP and routed experts, each normed, before the residual add
            raise _fail(f"block {bpath}", f"MLP output {mlp.out.name} added to {[a.name for a in other]}, not to "
                        f"the residual stream {resid_add.name} (two MLP branches summed before the residual add?)",
                        "the add that joins the MLP to the residual stream")
        extra, unscaled = _block_tail(g, bpath, mlp_add, resid_post, bset, d_model, norms, nodes_of)
        if extra is not None:
            sites.add(name("hook_resid_mid2"), mlp_add)
            sites.add(name("hook_extra_out"), extra)
        if unscaled is not None:
            sites.add(name("hook_resid_unscaled"), unscaled)
    sites.add(name("hook_resid_post"), resid_post)

    return block_spec(sites, layer, bpath, att, mlp, resid_pre, None if parallel else resid_add,
                      ln1=ln1, ln2=ln2, ln1_post=att.post_norm, ln2_post=mlp.post_norm, parallel=parallel)


_ADDS = (aten.add.Tensor, aten.add_.Tensor)
_MULS = (aten.mul.Tensor, aten.mul_.Tensor)


@dataclass
class _Sublayer:
    """The token mixer a block's MLP follows, as `analyse_mlp` reads it: an
    attention (AttentionSites) or a mixer without attention scores, or none."""
    path: str | None
    out: fx.Node | None
    nodes: set
    d_model: object


def _skipped_block(sites: Sites, layer: int, bpath: str, before: BlockSpec) -> BlockSpec:
    """A block the forward skips (no node of it in the graph, between two that ran:
    Mllama's cross-attention layers on text alone): hook_resid_pre and
    hook_resid_post are both the stream the block before returned, no sublayers."""
    stream = sites.found[block_name(before.layer, "hook_resid_post")][0]
    sites.add(block_name(layer, "hook_resid_pre"), stream)
    sites.add(block_name(layer, "hook_resid_post"), stream)
    return block_spec(sites, layer, bpath, None, None, stream, None, d_model=before.d_model)


def _analyse_mixer_block(g: ShapedGraph, sites: Sites, layer: int, bpath: str, norms: dict, nodes_of,
                         d_model) -> BlockSpec:
    """A block with no attention softmax (a state-space or linear-attention layer:
    Mamba, Gated DeltaNet, RWKV, a short convolution). Its sublayers are the
    branches added to the residual stream on the way from hook_resid_pre to
    hook_resid_post: the one that mixes positions (`_mixes_positions`) is the
    token mixer -- hook_mixer_out, what it adds; ln1, the norm it reads -- and one
    after it that mixes none is the MLP (analyse_mlp's sites, ln2), resid_mid
    between them. A block of one MLP branch (Nemotron-H's MLP layers) has only
    the MLP. TransformerLens has no sites inside a mixer and fxlens names none;
    anything else (two mixers, an MLP before the mixer) is refused."""
    name = lambda short: block_name(layer, short)  # noqa: E731
    bnodes = nodes_of(bpath)
    bset = set(bnodes)
    resid_pre = block_input(g, bpath, bnodes, d_model)
    resid_post = output_node(bnodes)
    if resid_post is None or not g.is_resid(resid_post, d_model):
        raise _fail(f"block {bpath}", f"output {shape(resid_post) if resid_post else None}", "a residual output")
    branches = _stream_branches(g, bpath, resid_pre, resid_post, bset, d_model, norms, nodes_of)
    kinds = ["mixer" if _mixes_positions(g, nodes) else "mlp" for _, _, nodes in branches]
    if kinds not in (["mixer"], ["mixer", "mlp"], ["mlp"]):
        raise _fail(f"block {bpath}", f"no attention softmax and {len(kinds)} branch(es) added to the residual "
                    f"stream: {', '.join(f'{k} ({out.name})' for k, (_, out, _) in zip(kinds, branches))} "
                    f"(a mixer mixes positions: a convolution, a cumulative sum, a scan or a product over them)",
                    "one token mixer (attention or a state-space / linear-attention layer), then at most one MLP")
    mixer = post = None
    if kinds[0] == "mixer":
        _, out, nodes = branches[0]
        mixing = next(n for n in g.order if n in nodes and _mixing_op(g, n))
        mixer_path = _child(bpath, mixing) or bpath
        mnodes = set(nodes_of(mixer_path)) & nodes if mixer_path != bpath else nodes
        reads = [a for n in mnodes for a in n.all_input_nodes if a not in mnodes and a in nodes]
        ln1 = next((nm for nm in (norm_of(a, norms) for a in reads) if nm), None)
        post = norm_of(out, norms)
        if post is not None and (post == ln1 or post.startswith(mixer_path + ".")):
            post = None
        tag = "ln1_post" if ln1 else "ln1"     # as an attention's post-norm (LFM's post_operator_norm)
        for t, norm in (("ln1", ln1), (tag, post)):
            if norm:
                sites.add(name(f"{t}.hook_scale"), norms[norm]["scale"])
                sites.add(name(f"{t}.hook_normalized"), norms[norm]["normalized"])
        sites.add(name("hook_resid_pre"), resid_pre)
        sites.add(name("hook_mixer_out"), out)
        mixer = _Sublayer(mixer_path, out, nodes, d_model)
    else:
        sites.add(name("hook_resid_pre"), resid_pre)
        ln1 = None
    mlp = ln2 = resid_mid = None
    if kinds[-1] == "mlp":
        mlp = analyse_mlp(g, sites, layer, bpath, mixer or _Sublayer(None, None, set(), d_model), norms, nodes_of)
        ln2 = next((nm for nm in (norm_of(x, norms) for x in mlp.inputs) if nm), None)
        for t, norm in (("ln2", ln2), ("ln2_post" if ln2 else "ln2", mlp.post_norm)):
            if norm:
                sites.add(name(f"{t}.hook_scale"), norms[norm]["scale"])
                sites.add(name(f"{t}.hook_normalized"), norms[norm]["normalized"])
        if mixer is not None:
            resid_mid = branches[0][0]
            sites.add(name("hook_resid_mid"), resid_mid)
        sites.add(name("hook_mlp_out"), mlp.out)
    sites.add(name("hook_resid_post"), resid_post)
    return block_spec(sites, layer, bpath, None, mlp, resid_pre, resid_mid, d_model=d_model, ln1=ln1, ln2=ln2,
                      ln1_post=post, ln2_post=mlp.post_norm if mlp else None,
                      mixer=mixer.path if mixer is not None else None)


def _stream_branches(g: ShapedGraph, bpath: str, resid_pre: fx.Node, resid_post: fx.Node, bset: set,
                     d_model, norms: dict, nodes_of) -> list[tuple[fx.Node, fx.Node, set]]:
    """The residual stream's adds from `resid_pre` to `resid_post`, found back from
    the block output through casts, layout ops and scaling by constants or
    parameters (Mamba's residual in float32, MiniMax's alpha * residual) and norms
    of the whole stream (MiniMax's residual is the normed input): [(add, the
    branch output it adds, the branch's nodes)], in order."""
    def source(x):
        x = _scaled_source(x, stop=resid_pre)     # not past the input (Gemma's scaled embedding)
        norm = norm_of(x, norms)
        nnodes = nodes_of(norm) if norm is not None else []
        if norm is not None and x in nnodes:
            # the stream normalised whole on its way (MiniMax: resid = ln(x) * alpha + branch * beta)
            inner = set(nnodes)
            ins = list(dict.fromkeys(a for n in nnodes for a in n.all_input_nodes
                                     if a not in inner and g.is_resid(a, d_model)))
            if len(ins) == 1:
                return source(ins[0])
        return x

    def chain(x):
        x = source(x)
        if x is resid_pre:
            return []
        if x.target in _ADDS and x in bset and g.is_resid(x, d_model) and len(x.all_input_nodes) == 2:
            for side in x.all_input_nodes:
                before = chain(side)
                if before is not None:
                    branch, = (a for a in x.all_input_nodes if a is not side)
                    return before + [(x, branch)]
        return None

    adds = chain(resid_post)
    if adds is None:
        raise _fail(f"block {bpath}", f"block output {resid_post.name} not reached from the block input "
                    f"{resid_pre.name} by residual adds", "resid_post = resid_pre + the sublayers' outputs")
    out, stream = [], ancestors(resid_pre) | {resid_pre}
    for add, branch in adds:
        nodes = (ancestors(branch, lambda n: n in bset) | {branch}) - stream
        out.append((add, branch, nodes))
        stream |= nodes | {add}
    return out


def _mixing_op(g: ShapedGraph, n: fx.Node) -> bool:
    """An op that mixes positions without attention scores: a convolution (direct
    or by FFT), a cumulative sum (a scan's decay), logsumexp, a product over the
    positions axis (a [batch, ..., pos] operand: a token-mixing linear), a matrix
    product of two activations (an MLP multiplies activations by weights only), or one position
    of a [batch, pos, ...] value picked out (`select` on the sequence axis: a
    recurrence unrolled over the positions)."""
    if n.op != "call_function":
        return False
    s = shape(n)
    if n.target in _SEQUENCE_MIXERS or n.target in (aten.cumprod.default, aten.flip.default, aten.roll.default):
        # not a router's count of tokens per expert (a cumsum over a 1-d histogram)
        return s is not None and len(s) >= 3
    if n.target in _FFTS:
        return True                 # a long convolution computed by FFT (Hyena-style)
    lin = linear_parts(n)
    if lin is not None or _is_product(n):
        x = lin[0] if lin is not None else _operands(n)[0]
        sx = shape(x) if isinstance(x, fx.Node) else None
        if sx is not None and len(sx) >= 3 and same_size(sx[0], g.batch) and same_size(sx[-1], g.seq):
            return True             # a product over the positions (a token-mixing linear)
    if lin is None and _is_product(n):
        # a product of two activations (no parameter side): scores or a state over
        # positions (MiniMax's lightning attention: q k^T and k^T v per block)
        ops = [a for a in _operands(n) if isinstance(a, fx.Node)]
        return len(ops) == 2 and all(g.ids in ancestors(a) for a in ops)
    if n.target is aten.select.int:
        s = shape(n.args[0])
        dim = n.args[1] % len(s) if s else None
        return s is not None and len(s) >= 3 and dim not in (0, len(s) - 1) and same_size(s[dim], g.seq)
    return False


def _mixes_positions(g: ShapedGraph, nodes: set) -> bool:
    return any(_mixing_op(g, n) for n in nodes)


def _unmasked(g: ShapedGraph, node: fx.Node) -> fx.Node:
    """`node` before a multiply by a per-position [batch, pos, 1] value that no
    embedding lookup reaches (a padding mask: ZAYA zeroes padded positions before its
    q/k convolution), through layout ops; else `node`."""
    cur = walk_back(node, is_layout)[-1]
    if cur.target not in _MULS or len(cur.args) != 2 \
            or not all(isinstance(a, fx.Node) for a in cur.args):
        return node
    for x, m in (cur.args, cur.args[::-1]):
        if _is_padding_factor(g, m):
            return x
    return node


def _is_padding_factor(g: ShapedGraph, m) -> bool:
    """One factor per position ([batch, pos, 1]) computed from the inputs alone --
    no embedding, projection or floating-point parameter upstream: a padding mask."""
    s = shape(m) if isinstance(m, fx.Node) else None
    if s is None or len(s) != 3 or s[-1] != 1 or not same_size(s[0], g.batch) or not same_size(s[1], g.seq):
        return False
    up = ancestors(m) | {m}
    return not any(n.target is aten.embedding.default or n.target in MATMUL_OPS or linear_parts(n)
                   or (n.op == "get_attr" and val(n) is not None and val(n).is_floating_point()) for n in up)


def _stack_mixture(g: ShapedGraph, bnodes: list, bset: set) -> tuple[fx.Node, fx.Node] | None:
    """(softmax, stack) where the block mixes a [batch, pos, n, width] stack of values
    (states concatenated along n: the block's input, earlier blocks'), by a softmax over its n
    entries ([batch, pos, queries, n] weights) and a product with it: Inkling 2's
    block attention residuals. None where there is no such mixture (an attention's
    [batch, head, query, key] softmax is over positions, a router's over experts)."""
    for sm in bnodes:
        s = shape(sm) if sm.op == "call_function" and sm.target in SOFTMAX_OPS else None
        if not s or len(s) != 4 or not (same_size(s[0], g.batch) and same_size(s[1], g.seq)) \
                or not isinstance(s[-1], int) or s[-1] < 2 or same_size(s[-2], g.seq):
            continue
        for mm in (u for n in layout_closure(sm) for u in n.users if u in bset and _is_product(u)):
            for op in _operands(mm):
                st = shape(op)
                if st is None or len(st) != 4 or not same_size(st[0], g.batch) or not same_size(st[1], g.seq) \
                        or st[2] != s[-1] or op in layout_closure(sm):
                    continue
                stacking = [c for c in ancestors(op, lambda n: n in bset) | {op} if c.target is aten.cat.default
                            and len(shape(c) or ()) == 4 and (c.args[1] if len(c.args) > 1 else 0) in (2, -2)]
                if stacking:
                    return sm, op
    return None


def _streams_per_position(g: ShapedGraph, node: fx.Node | None) -> int:
    """n where `node` holds n > 1 [batch, pos, width] streams: a 4-d value whose one
    dimension besides batch, pos and the last is a constant n ([b, s, n, d] or
    [n, b, s, d]); else 0."""
    s = shape(node) if node is not None else None
    if s is None or len(s) != 4:
        return 0
    for n_at, (b_at, s_at) in ((2, (0, 1)), (0, (1, 2))):
        if same_size(s[b_at], g.batch) and same_size(s[s_at], g.seq) and isinstance(s[n_at], int) and s[n_at] > 1:
            return s[n_at]
    return 0


def _is_stream_of(node: fx.Node, resid: fx.Node, norms: dict) -> bool:
    """Whether `node`, the value an MLP output is added to, may be the residual
    stream `resid`: `resid` through casts, layout ops and scaling by constants or
    parameters (Beam's depth-scaled residual, Doge's learned residual weights),
    or normalised (a post-LN block's MLP adds to norm(resid_mid): BART, TrOCR), or
    a value no norm made (a cross-attention's add, Inkling's short conv). Only a
    norm of something else is not (Gemma 4's MoE block: a dense MLP and routed
    experts, each normed, summed before the residual add)."""
    stop = _scaled_source(node)
    if stop is resid:
        return True
    norm = norm_of(stop, norms)
    return norm is None or resid in ancestors(stop, lambda n: n is resid or norm in module_paths(n))


def _resid_add(branch_out: fx.Node) -> fx.Node | None:
    """The add joining a branch output to the residual stream."""
    return next((u for u in branch_out.users if u.target in _ADDS), None)


def _next_resid_add(g: ShapedGraph, stream: fx.Node, bset: set, d_model) -> fx.Node | None:
    """The first add after `stream` (a residual-stream value) that joins it to a
    branch computed in the block: the next sublayer's residual add."""
    adds = [u for u in stream.users if u in bset and u.target in _ADDS and g.is_resid(u, d_model)
            and all(a is stream or a in bset for a in u.all_input_nodes)]
    return min(adds, key=g.order.__getitem__) if adds else None


def _is_gain(node: fx.Node, stream: fx.Node) -> bool:
    """`stream * c` with c a one-element parameter or buffer, through casts
    (Gemma 4's layer_scalar)."""
    if node.target not in _MULS or len(node.args) != 2 or stream not in node.args:
        return False
    other = node.args[1] if node.args[0] is stream else node.args[0]
    if not isinstance(other, fx.Node):
        return isinstance(other, (int, float))
    src = walk_back(other, lambda n: n.target in CASTS or is_layout(n))[-1]
    return src.op == "get_attr" and val(src) is not None and val(src).numel() == 1


def _is_position_mask(g: ShapedGraph, node: fx.Node, stream: fx.Node) -> bool:
    """`stream * m` with m a padding mask (`_is_padding_factor`) zeroing the stream
    at padded positions (XLM's `tensor *= mask` after each layer)."""
    if node.target not in _MULS or len(node.args) != 2 or stream not in node.args:
        return False
    return _is_padding_factor(g, node.args[1] if node.args[0] is stream else node.args[0])


def _scaled_source(node: fx.Node, stop: fx.Node | None = None) -> fx.Node:
    """The value `node` is, up to casts, layout ops and scaling by constants or
    parameters (Beam's depth-scaled residual, Doge's learned residual weights);
    not walked past `stop`."""
    while node is not stop:
        if node.target in CASTS or is_layout(node) or is_scalar_scale(node):
            ins = [a for a in node.all_input_nodes if val(a) is not None and val(a).dim() > 0]
        elif node.target in (aten.mul.Tensor, aten.div.Tensor):
            ins = [a for a in node.all_input_nodes if a.op != "get_attr"]
        else:
            return node
        if len(ins) != 1:
            return node
        node = ins[0]
    return node


def _block_tail(g: ShapedGraph, bpath: str, mlp_add: fx.Node, resid_post: fx.Node, bset: set,
                d_model, norms: dict, nodes_of) -> tuple[fx.Node | None, fx.Node | None]:
    """From the MLP's residual add to the block output: at most one more branch
    joined by an add (returns its output, what is added) and then at most one
    one-element gain on the stream (returns the stream before it), a post-LN
    block's norm on the way (BART, BERT: resid_post = norm(resid_mid + mlp_out)).
    Anything else is refused: TransformerLens's resid_post = resid_mid + mlp_out
    would not hold."""
    extra = unscaled = None
    cur = mlp_add
    while cur is not resid_post:
        in_norm = {next((p for p in module_paths(u) if p in norms), None) for u in cur.users}
        if len(in_norm) == 1 and None not in in_norm:
            out = output_node(nodes_of(in_norm.pop()))
            if out is not None and out is not cur and out in bset:
                cur = out       # the stream normalised whole (post-LN)
                continue
        steps = [u for u in cur.users if u in bset and g.is_resid(u, d_model)
                 and (u.target in _ADDS or _is_gain(u, cur) or u.target in CASTS or is_layout(u)
                      or _is_position_mask(g, u, cur))]
        if len(steps) != 1:
            raise _fail(f"block {bpath}", f"residual stream {cur.name} after the MLP used by "
                        f"{[u.name for u in cur.users]}", "one path from the MLP's residual add to the block output")
        u = steps[0]
        if u.target in _ADDS:
            if extra is not None or unscaled is not None:
                raise _fail(f"block {bpath}", f"a second branch ({u.name}) after the MLP", "at most one")
            branch = [a for a in u.all_input_nodes if a is not cur]
            if len(branch) != 1 or branch[0] not in bset:
                raise _fail(f"block {bpath}", f"add {u.name} after the MLP", "a branch computed in the block")
            extra = branch[0]
        elif _is_gain(u, cur):
            if unscaled is not None:
                raise _fail(f"block {bpath}", f"a second gain ({u.name}) on the residual stream", "at most one")
            unscaled = cur
        cur = u
    return extra, unscaled


def _branch_nodes(linears: list, allowed: set, norms: dict) -> list:
    """The nodes of a branch made of loose linears: everything computed from them
    inside the block, up to (not including) the add that joins the residual."""
    order = {n: i for i, n in enumerate(linears[0].graph.nodes)}
    downstream = set(linears)
    todo = list(linears)
    while todo:
        for u in todo.pop().users:
            if u in allowed and u not in downstream:
                downstream.add(u)
                todo.append(u)
    out: set = set()
    todo = list(linears)
    while todo:
        n = todo.pop()
        if n in out or n not in allowed or any(p in norms for p in module_paths(n)):
            continue
        # an add taking a value from outside the branch joins it to the residual stream
        if n.target in (aten.add.Tensor, aten.add_.Tensor) and any(
                a not in downstream and a.op != "get_attr" and val(a) is not None for a in n.all_input_nodes):
            continue
        out.add(n)
        todo.extend(n.users)
    return sorted(out, key=order.__getitem__)


def _nearest(start: fx.Node, allowed: set, pred, back: bool) -> fx.Node | None:
    """Breadth-first nearest node satisfying `pred`, walking inputs (back) or users."""
    frontier, seen = [start], {start}
    while frontier:
        nxt = []
        for n in frontier:
            for m in (n.all_input_nodes if back else n.users):
                if m in seen or m not in allowed:
                    continue
                if pred(m):
                    return m
                seen.add(m)
                nxt.append(m)
        frontier = nxt
    return None


def _assembled_operand(g: ShapedGraph, op: fx.Node, width: int, projs: list, inside):
    """The per-head value entering QK^T (or pattern@V) as operand `op`, when it is
    put together from the outputs of more than one projection (MLA's key: its
    no-rope part up-projected per head, its rope part made once and expanded to
    every head, the two concatenated): (that value, the projections in graph order),
    or None."""
    chain = walk_back(op, lambda n: is_layout(n) or is_scalar_scale(n))
    node = next((n for n in reversed(chain) if g.head_layout(n, width)), None)
    if node is None:
        return None
    anc = ancestors(node, inside)
    sources = sorted((p for p in projs if p in anc), key=g.order.__getitem__)
    return (node, sources) if len(sources) > 1 else None


def _descendants(node: fx.Node, allowed: set) -> set:
    out, todo = set(), [node]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in allowed and u not in out:
                out.add(u)
                todo.append(u)
    return out


def _nearest_in(node: fx.Node, targets: set, g: ShapedGraph) -> fx.Node | None:
    """The latest node of `targets` that `node` is computed from (or `node` itself)."""
    if node in targets:
        return node
    anc = ancestors(node) & set(targets)
    return max(anc, key=g.order.__getitem__) if anc else None
