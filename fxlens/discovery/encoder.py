"""Encoder (BERT-style) site discovery under TransformerLens's `HookedEncoder` names.

The attention and MLP inside a block are found exactly as for decoders
(`decoder.analyse_attention` / `analyse_mlp`: scores, pattern, z, q/k/v from
the softmax and its matmuls). What differs is found here, again from module
provenance and dataflow only:

  post-LN blocks   resid_mid = resid_pre + attn_out; ln1 = the norm reading it,
                   whose output the MLP reads; resid_post = ln1(resid_mid) +
                   mlp_out; ln2 = the norm reading resid_post, whose output
                   (hook_normalized_resid_post) is the next block's resid_pre
  embeddings       embed = the input embeddings module; token_type = the
                   embedding whose indices are the `token_type_ids` input (or a
                   constant buffer); pos = the remaining embedding summed in;
                   embed.ln = the norm on that sum, hook_full_embed its output
  MLM head         mlm_head.ln = the norm on the unembedding's input, when a
                   transform (dense + act) sits between it and the last block;
                   a model without output embeddings (BertModel) has no head
                   sites and returns the last residual
"""

from __future__ import annotations

import contextlib

import torch
import torch.fx as fx

from fxlens.discovery.decoder import (BlockSpec, ModelSpec, ShapedGraph, Sites, analyse_attention, analyse_mlp,
                                      block_input, block_spec, find_blocks, module_output, nodes_in, norm_of, norm_paths, residual_layout,
                                      unmappable)
from fxlens.discovery.names import block_name
from fxlens.errors import UnmappableModelError
from fxlens.ir.graph import ancestors, is_layout, linear_parts, module_paths, output_node, same_size, shape, walk_back
from fxlens.ir.hook_points import Layout
from fxlens.ir.params import get_tensor
from fxlens.ir.pass_result import PassResult

aten = torch.ops.aten

INPUTS = "fxlens_encoder_inputs"              # the EncoderInputs submodule of the graph (fxlens.frontend.encoder)
_ADDS = (aten.add.Tensor, aten.add_.Tensor)


_SCOPE = ("fxlens maps encoders with post-LN blocks (BERT-style, as TransformerLens's "
          "HookedEncoder), each one attention (eager softmax) and one MLP.")


def _fail(what: str, found: str, missing: str) -> UnmappableModelError:
    return unmappable(what, found, missing, _SCOPE)


@contextlib.contextmanager
def _encoder_scope():
    """The shared helpers' errors end by describing decoders; say what encoders need."""
    try:
        yield
    except UnmappableModelError as exc:
        if exc.parts is None:
            raise
        raise unmappable(*exc.parts, _SCOPE) from exc


def _residual_add(branch_out: fx.Node, where: str) -> fx.Node:
    """The add that joins a branch output to the residual stream."""
    add = next((u for u in branch_out.users if u.target in _ADDS), None)
    if add is None:
        raise _fail(where, f"{branch_out.name} used by {[u.name for u in branch_out.users]}",
                    "the add that joins it to the residual stream")
    return add


def _norm_reading(node: fx.Node, norms: dict) -> str | None:
    """The norm module that reads `node` (a user tagged with a norm's path)."""
    for u in node.users:
        for p in module_paths(u):
            if p in norms:
                return p
    return None


def _encoder_block(g: ShapedGraph, sites: Sites, layer: int, bpath: str, norms: dict, nodes_of) -> BlockSpec:
    name = lambda short: block_name(layer, short)  # noqa: E731
    bnodes = nodes_of(bpath)
    att = analyse_attention(g, sites, layer, bpath, norms, nodes_of)
    d_model = att.d_model
    resid_pre = block_input(g, bpath, bnodes, d_model)
    mlp = analyse_mlp(g, sites, layer, bpath, att, norms, nodes_of)

    # post-LN: resid_mid = resid_pre + attn_out -> ln1 -> MLP
    resid_mid = _residual_add(att.out, f"attention {att.path}")
    ln1 = _norm_reading(resid_mid, norms)
    if ln1 is None:
        raise _fail(f"block {bpath}", f"resid_mid {resid_mid.name} read by no norm", "ln1 (post-LN)")
    normalized_mid = output_node(nodes_of(ln1))             # ln1(resid_mid), with its weight and bias
    mlp_reads = set().union(*(ancestors(x) | {x} for x in mlp.inputs)) if mlp.inputs else set()
    if normalized_mid not in mlp_reads:
        raise _fail(f"block {bpath}", f"an MLP that does not read {ln1}", "ln1 feeding the MLP (post-LN)")
    # resid_post = ln1(resid_mid) + mlp_out -> ln2 -> next block
    resid_post = _residual_add(mlp.out, f"MLP of {bpath}")
    if walk_back(next(a for a in resid_post.args if a is not mlp.out), is_layout)[-1] is not normalized_mid:
        raise _fail(f"block {bpath}", f"a residual add {resid_post.name} that skips {ln1}",
                    "resid_post = ln1(resid_mid) + mlp_out (post-LN)")
    ln2 = _norm_reading(resid_post, norms)
    if ln2 is None:
        raise _fail(f"block {bpath}", f"resid_post {resid_post.name} read by no norm", "ln2 (post-LN)")
    normalized_post = output_node(nodes_of(ln2))
    if not g.is_resid(normalized_post, d_model):
        raise _fail(f"block {bpath}", f"{ln2} output of shape {shape(normalized_post)}", "a residual output")

    sites.add(name("hook_resid_pre"), resid_pre)
    sites.add(name("hook_attn_out"), att.out)
    sites.add(name("hook_resid_mid"), resid_mid)
    for tag, norm in (("ln1", ln1), ("ln2", ln2)):
        sites.add(name(f"{tag}.hook_scale"), norms[norm]["scale"])
        sites.add(name(f"{tag}.hook_normalized"), norms[norm]["normalized"])
    sites.add(name("hook_mlp_out"), mlp.out)
    sites.add(name("hook_resid_post"), resid_post)
    sites.add(name("hook_normalized_resid_post"), normalized_post)
    # BlockSpec keeps the decoder meaning that passes read (opt_in's hook_q_input,
    # hook_mlp_in): ln1 / ln2 = the norm feeding the attention / the MLP. Post-LN,
    # nothing normalises the attention's input, and the MLP's norm is TL's ln1.
    return block_spec(sites, layer, bpath, att, mlp, resid_pre, resid_mid, ln1=None, ln2=ln1)


def _index_origin(gm: fx.GraphModule, idx: fx.Node) -> str:
    """Where an embedding's indices come from, through views, expands and gathers:
    an input's name ("input_ids", "token_type_ids"), "constant" (a buffer or
    tensor of one value, e.g. HF's zero token-type buffer) or "computed"."""
    n = idx
    while True:
        if n.op == "call_module" and n.target == INPUTS:
            return n.args[1]
        if n.op == "placeholder":
            return n.target
        if n.op == "get_attr":
            t = get_tensor(gm, n.target)
            return "constant" if t.numel() and bool((t == t.flatten()[0]).all()) else "computed"
        if n.op == "call_function" and n.target in (aten.zeros.default, aten.zeros_like.default):
            return "constant"
        if n.op == "call_function" and (is_layout(n) or n.target is aten.gather.default) \
                and isinstance(n.args[0], fx.Node):
            n = n.args[0]
            continue
        return "computed"


def _embeddings(g: ShapedGraph, sites: Sites, first: BlockSpec, norms: dict, nodes_of, embed_path: str | None):
    """hook_embed, hook_pos_embed, hook_token_type_embed, embed.ln.*, hook_full_embed."""
    first_in, = sites.handles[first.resid_pre]
    feeding = ancestors(first_in)
    embeddings = [n for n in g.graph.nodes if n.target is aten.embedding.default and n in feeding]
    word = next((n for n in embeddings if embed_path and embed_path in module_paths(n)), None)
    if word is None:
        raise _fail("embeddings", f"{len(embeddings)} embedding node(s)", f"the token embedding {embed_path!r}")
    others = [n for n in embeddings if n is not word]
    token_type = [n for n in others if _index_origin(g.gm, n.args[1]) in ("token_type_ids", "constant")]
    pos = [n for n in others if n not in token_type]
    if len(token_type) > 1 or len(pos) > 1:
        raise _fail("embeddings", f"{len(token_type)} token-type and {len(pos)} position embedding(s)",
                    "at most one of each")
    sites.add("embed.hook_embed", word)
    for site, found in (("embed.hook_pos_embed", pos), ("embed.hook_token_type_embed", token_type)):
        if found:
            # HF adds one [1, pos, d_model] position row to every sequence; hooks see [batch, pos, d_model]
            sites.add(site, found[0], Layout("same") if same_size(shape(found[0])[0], g.batch) else Layout("batch"))
    # the norm on the sum of the embeddings; its output is the full embedding
    ln = norm_of(first_in, norms)
    full = walk_back(first_in, is_layout)[-1]
    if ln is not None and word in ancestors(norms[ln]["normalized"]):
        sites.add("embed.ln.hook_scale", norms[ln]["scale"])
        sites.add("embed.ln.hook_normalized", norms[ln]["normalized"])
        full = output_node(nodes_of(ln))
    sites.add("hook_full_embed", full)
    return word, (pos[0] if pos else None)


def _head(g: ShapedGraph, sites: Sites, blocks: list, norms: dict, nodes_of, unembed_path: str | None):
    """mlm_head.ln.* (or ln_final.* on the residual itself), unembed.hook_in / hook_out."""
    unembed = None
    for n in g.graph.nodes:
        if n.op == "call_function" and unembed_path and unembed_path in module_paths(n) and linear_parts(n):
            unembed = n
    if unembed is None:
        return None, None
    x_in = linear_parts(unembed)[0]
    norm = norm_of(x_in, norms)
    if norm is not None and any(norm.startswith(b.path + ".") for b in blocks):
        norm = None
    if norm is not None:
        # BERT's head is dense -> act -> LayerNorm; a norm on the residual itself is ln_final
        inside = set(nodes_of(norm))
        norm_in = {walk_back(a, is_layout)[-1] for n in inside for a in n.all_input_nodes
                   if a not in inside and g.is_resid(a, blocks[-1].d_model)}
        prefix = "ln_final" if output_node(nodes_of(blocks[-1].path)) in norm_in else "mlm_head.ln"
        sites.add(f"{prefix}.hook_scale", norms[norm]["scale"])
        sites.add(f"{prefix}.hook_normalized", norms[norm]["normalized"])
    sites.add("unembed.hook_in", x_in)
    sites.add("unembed.hook_out", module_output(nodes_of, unembed, ""))
    return unembed, norm


def analyse_encoder(gm: fx.GraphModule, embed_path: str | None, unembed_path: str | None) -> ModelSpec:
    g = ShapedGraph(gm)
    sites = Sites()
    norms = norm_paths(g.graph)
    cache: dict[str, list[fx.Node]] = {}

    def nodes_of(path: str) -> list[fx.Node]:
        if path not in cache:
            cache[path] = nodes_in(g.graph, path)
        return cache[path]

    with _encoder_scope():
        blocks = [_encoder_block(g, sites, layer, bpath, norms, nodes_of) for layer, bpath in find_blocks(g)]
    embed, pos_embed = _embeddings(g, sites, blocks[0], norms, nodes_of, embed_path)
    unembed, head_norm = _head(g, sites, blocks, norms, nodes_of, unembed_path)
    d_vocab = shape(unembed)[-1] if unembed is not None else get_tensor(gm, embed.args[0].target).shape[0]
    for site, (node, layout, edge) in list(sites.found.items()):
        sites.found[site] = (node, residual_layout(gm.graph, node, layout), edge)
    spec = ModelSpec(blocks=blocks, d_model=int(blocks[0].d_model), d_vocab=int(d_vocab),
                     norm_kinds={p: d["kind"] for p, d in norms.items()}, ln_final=None,
                     embed=sites.handle("embed", embed),
                     pos_embed=sites.handle("pos_embed", pos_embed) if pos_embed is not None else None,
                     unembed=sites.handle("unembed", unembed) if unembed is not None else None,
                     sites=tuple(sites.found), notes=[f"head norm {head_norm}"] if head_norm else [])
    sites.commit(g.graph)
    return spec


def discover_encoder_sites(gm: fx.GraphModule, ctx) -> PassResult:
    """Annotate `node.meta["fxlens.sites"]` with HookedEncoder names; the spec goes on the context."""
    ctx.spec = analyse_encoder(gm, ctx.embed_path, ctx.unembed_path)
    return PassResult("discover_encoder_sites", matched=len(ctx.spec.sites),
                      details={"blocks": ctx.spec.n_layers})
