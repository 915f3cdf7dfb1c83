"""Encoders (BERT-style) under TransformerLens's `HookedEncoder` names.

The attention and MLP inside a block are found exactly as for decoders
(`analysis.analyse_attention` / `analyse_mlp`: scores, pattern, z, q/k/v from
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

Capture exports `input_ids` plus the optional inputs the model's forward takes
(`attention_mask`, `token_type_ids`), then routes those through one
`EncoderInputs` module, so the graph -- like a decoder's -- takes `input_ids`
only and every runner (eager, compiled, self-check) calls it the same way. A
call binds a mask or token types for its own duration (as hooks are bound);
unbound, they default to all-ones and all-zeros like HF's.

Weight processing (fold_ln, centring, ...) is not done for encoders, as
TransformerLens's HookedEncoder does not do it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from safetensors import SafetensorError

from fxlens.frontend import compat
from fxlens.discovery.decoder import (BlockSpec, ModelSpec, _find_blocks, _Graph, _module_output, _nodes_in,
                       _norm_of, _norm_paths, _Sites, analyse_attention, analyse_mlp, block_input,
                       residual_layout)
from fxlens.frontend.decoder import (Captured, corrupt_weights_error, functionalise, load_model, n_ctx_of,
                                     own_tensors, plain_graph_module)
from fxlens.discovery.config import make_config
from fxlens.errors import CaptureError, SelfCheckError, UnmappableModelError
from fxlens.ir.graph import ancestors, is_layout, linear_parts, module_paths, output_node, same_size, shape, walk_back
from fxlens.ir.hook_points import Layout
from fxlens.runtime.model import HookedModel
from fxlens.discovery.names import block_name
from fxlens.ir.params import get_tensor
from fxlens.ir.pass_result import PassResult

aten = torch.ops.aten

INPUTS = "fxlens_encoder_inputs"              # the EncoderInputs submodule of the graph
OPTIONAL_INPUTS = ("attention_mask", "token_type_ids")
_ADDS = (aten.add.Tensor, aten.add_.Tensor)


# --- capture ---------------------------------------------------------------------------

class EncoderInputs(nn.Module):
    """The encoder's optional inputs as a graph node. `bound` holds the tensors
    of the call in progress (set by `HookedEncoder`, cleared when it returns);
    unbound, the mask is all ones and the token types all zeros."""

    def __init__(self):
        super().__init__()
        self.bound: dict[str, torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor, which: str) -> torch.Tensor:
        x = self.bound.get(which)
        if x is not None:
            return x
        return torch.ones_like(input_ids) if which == "attention_mask" else torch.zeros_like(input_ids)


def route_optional_inputs(gm: fx.GraphModule) -> fx.GraphModule:
    """placeholder(attention_mask) -> EncoderInputs(input_ids, "attention_mask"),
    likewise token_type_ids; shape reads of them read input_ids instead."""
    graph = gm.graph
    gm.add_module(INPUTS, EncoderInputs())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    ids = next(n for n in placeholders if n.target == "input_ids")
    for ph in placeholders:
        if ph is ids:
            continue
        for u in list(ph.users):
            if u.target is aten.sym_size.int:
                u.replace_input_with(ph, ids)    # [batch, pos] like input_ids
        with graph.inserting_after(placeholders[-1]):
            node = graph.call_module(INPUTS, (ids, ph.target))
        node.meta.update({k: v for k, v in ph.meta.items() if k == "val"})
        ph.replace_all_uses_with(node)
        graph.erase_node(ph)
    # the pooler / next-sentence head feed outputs that plain_graph_module dropped
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


@dataclass
class EncoderCaptured(Captured):
    """A captured encoder; `graph_module()` takes `input_ids` only."""

    kind = "encoder"

    def graph_module(self, own: bool = True) -> fx.GraphModule:
        gm = route_optional_inputs(plain_graph_module(self.program))
        return own_tensors(gm) if own else gm


def _hf_class(source: str, hf_kwargs: dict):
    """The class the checkpoint declares (`config.architectures`), else masked LM, else base model."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    cfg_kwargs = {k: hf_kwargs[k] for k in ("revision", "trust_remote_code", "cache_dir",
                                             "local_files_only", "subfolder", "token") if k in hf_kwargs}
    config = AutoConfig.from_pretrained(source, **cfg_kwargs)
    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return AutoModelForMaskedLM if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else AutoModel


def load_encoder(source, dtype=torch.float32, **hf_kwargs):
    """(model, tokenizer or None, name) for a folder, a cached hub id or a PreTrainedModel."""
    from transformers import PreTrainedModel

    if isinstance(source, (str, os.PathLike)):
        from transformers import AutoTokenizer

        source = str(source)
        if not os.path.isdir(source):
            hf_kwargs.setdefault("local_files_only", True)
        tokenizer = hf_kwargs.pop("tokenizer", None)
        try:
            cls = _hf_class(source, hf_kwargs)
            model = cls.from_pretrained(source, attn_implementation="eager", dtype=dtype, **hf_kwargs)
        except SafetensorError as exc:
            raise corrupt_weights_error(source, exc) from exc
        except (OSError, ValueError) as exc:
            raise CaptureError(
                f"cannot load {source!r} as an encoder: {exc}. Pass a checkpoint folder, a hub id "
                f"that is already in the local HF cache, or a PreTrainedModel.") from exc
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(
                    source, **{k: v for k, v in hf_kwargs.items() if k == "local_files_only"})
            except Exception as exc:  # a checkpoint without tokenizer files is fine: tokens still work
                warnings.warn(f"no tokenizer loaded from {source!r} ({type(exc).__name__}); "
                              f"pass token ids, or tokenizer=...", stacklevel=3)
        model, tokenizer, _ = load_model(model, dtype=dtype, tokenizer=tokenizer)
        return model, tokenizer, source
    if not isinstance(source, PreTrainedModel):
        raise CaptureError(f"cannot load an encoder from {type(source).__name__}; pass a path, "
                           f"a cached hub id or a transformers PreTrainedModel")
    return load_model(source, dtype=dtype, **hf_kwargs)


def export_encoder(model, n_ctx: int) -> torch.export.ExportedProgram:
    """Export `model(input_ids, attention_mask=, token_type_ids=)` (those the forward
    takes) with dynamic batch and sequence."""
    batch, seq = compat.export_dims(n_ctx)
    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    probe = torch.randint(0, vocab, (2, min(8, n_ctx)), generator=torch.Generator().manual_seed(0)).to(device)
    takes = inspect.signature(model.forward).parameters
    kwargs = {"attention_mask": torch.ones_like(probe), "token_type_ids": torch.zeros_like(probe)}
    kwargs = {k: v for k, v in kwargs.items() if k in takes}
    dims = {"input_ids": {0: batch, 1: seq}, **{k: {0: batch, 1: seq} for k in kwargs}}
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (probe,), kwargs=kwargs, dynamic_shapes=dims, strict=False)
    except Exception as exc:
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. fxlens needs a model that exports "
            f"with dynamic batch and sequence length.") from exc
    return functionalise(ep)


def capture_encoder(source, dtype=torch.float32, **hf_kwargs) -> EncoderCaptured:
    model, tokenizer, name = load_encoder(source, dtype=dtype, **hf_kwargs)
    n_ctx = n_ctx_of(model.config)
    program = export_encoder(model, n_ctx)
    return EncoderCaptured(program=program, hf_model=model, tokenizer=tokenizer, n_ctx=n_ctx, name=name)


# --- site discovery ----------------------------------------------------------------------

_SCOPE = ("fxlens maps encoders with post-LN blocks (BERT-style, as TransformerLens's "
          "HookedEncoder), each one attention (eager softmax) and one MLP.")


def _fail(what: str, found: str, missing: str) -> UnmappableModelError:
    return UnmappableModelError(f"cannot map {what}: found {found}; missing {missing}. {_SCOPE}")


@contextlib.contextmanager
def _encoder_scope():
    """The shared helpers' errors end by describing decoders; say what encoders need."""
    try:
        yield
    except UnmappableModelError as exc:
        what = str(exc).split(". fxlens maps")[0]
        raise UnmappableModelError(f"{what}. {_SCOPE}") from exc


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


def _encoder_block(g: _Graph, sites: _Sites, layer: int, bpath: str, norms: dict, nodes_of) -> BlockSpec:
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
    return BlockSpec(layer=layer, path=bpath, attn=att.path, mlp=mlp.path, ln1=None, ln2=ln1,
                     gated=mlp.gated, rotary=att.rotary, moe=mlp.moe, n_heads=att.n_heads,
                     n_kv_heads=att.n_kv_heads, d_head=att.d_head, d_mlp=mlp.d_mlp, d_model=d_model,
                     projections=att.projections, qkv=att.qkv, o_proj=att.o_proj, z=att.z,
                     mlp_proj=mlp.proj, writer=mlp.writer, post=mlp.post, resid_pre=resid_pre,
                     resid_mid=resid_mid, mlp_in_node=mlp.inputs[0] if mlp.inputs else None,
                     mlp_nodes=mlp.nodes)


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


def _embeddings(g: _Graph, sites: _Sites, first: BlockSpec, norms: dict, nodes_of, embed_path: str | None):
    """hook_embed, hook_pos_embed, hook_token_type_embed, embed.ln.*, hook_full_embed."""
    first_in = first.resid_pre
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
    ln = _norm_of(first_in, norms)
    full = walk_back(first_in, is_layout)[-1]
    if ln is not None and word in ancestors(norms[ln]["normalized"]):
        sites.add("embed.ln.hook_scale", norms[ln]["scale"])
        sites.add("embed.ln.hook_normalized", norms[ln]["normalized"])
        full = output_node(nodes_of(ln))
    sites.add("hook_full_embed", full)
    return word, (pos[0] if pos else None)


def _head(g: _Graph, sites: _Sites, blocks: list, norms: dict, nodes_of, unembed_path: str | None):
    """mlm_head.ln.* (or ln_final.* on the residual itself), unembed.hook_in / hook_out."""
    unembed = None
    for n in g.graph.nodes:
        if n.op == "call_function" and unembed_path and unembed_path in module_paths(n) and linear_parts(n):
            unembed = n
    if unembed is None:
        return None, None
    x_in = linear_parts(unembed)[0]
    norm = _norm_of(x_in, norms)
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
    sites.add("unembed.hook_out", _module_output(nodes_of, unembed, ""))
    return unembed, norm


def analyse_encoder(gm: fx.GraphModule, embed_path: str | None, unembed_path: str | None) -> ModelSpec:
    g = _Graph(gm)
    sites = _Sites()
    norms = _norm_paths(g.graph)
    cache: dict[str, list[fx.Node]] = {}

    def nodes_of(path: str) -> list[fx.Node]:
        if path not in cache:
            cache[path] = _nodes_in(g.graph, path)
        return cache[path]

    with _encoder_scope():
        blocks = [_encoder_block(g, sites, layer, bpath, norms, nodes_of) for layer, bpath in _find_blocks(g)]
    embed, pos_embed = _embeddings(g, sites, blocks[0], norms, nodes_of, embed_path)
    unembed, head_norm = _head(g, sites, blocks, norms, nodes_of, unembed_path)
    d_vocab = shape(unembed)[-1] if unembed is not None else get_tensor(gm, embed.args[0].target).shape[0]
    for site, (node, layout, edge) in list(sites.found.items()):
        sites.found[site] = (node, residual_layout(gm.graph, node, layout), edge)
    sites.commit(g.graph)
    return ModelSpec(blocks=blocks, d_model=int(blocks[0].d_model), d_vocab=int(d_vocab),
                     norm_kinds={p: d["kind"] for p, d in norms.items()}, ln_final=None,
                     embed=embed, pos_embed=pos_embed, unembed=unembed,
                     sites={k: v[0] for k, v in sites.found.items()},
                     notes=[f"head norm {head_norm}"] if head_norm else [])


def discover_encoder_sites(gm: fx.GraphModule, ctx) -> PassResult:
    """Annotate `node.meta["fxlens.sites"]` with HookedEncoder names; the spec goes on the context."""
    ctx.spec = analyse_encoder(gm, ctx.embed_path, ctx.unembed_path)
    return PassResult("discover_encoder_sites", matched=len(ctx.spec.sites),
                      details={"blocks": ctx.spec.n_layers})


def encoder_pipeline() -> tuple:
    from fxlens.pipeline import BACK, FRONT

    expose = next(p for p in FRONT if p[0] == "expose_norms")
    return (expose, ("discover_sites", discover_encoder_sites)) + BACK


# --- the model ---------------------------------------------------------------------------

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


# --- building ----------------------------------------------------------------------------

def _self_check(gm, hf_model, n_ctx: int, d_vocab: int, rtol: float) -> float:
    """The graph's output vs the HF model's first output (MLM logits, or the last
    hidden state of a bare encoder) on a probe input."""
    probe = torch.randint(0, d_vocab, (2, min(7, n_ctx)), generator=torch.Generator().manual_seed(1))
    probe = probe.to(next(hf_model.parameters()).device)
    with torch.no_grad():
        want = hf_model(probe)[0].float()
        got = gm(probe).float()
    err = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), 1.0)
    if not err <= rtol * scale:
        raise SelfCheckError(
            f"the instrumented encoder's outputs differ from the original model's by {err:.3g} "
            f"(largest {scale:.3g}) on a probe input; fxlens refuses to return wrong numbers. "
            f"Please report the model.")
    return err


def build_encoder(source, *, device=None, dtype=torch.float32, self_check: bool = True, on_pass=None,
                  hf_kwargs: dict) -> HookedEncoder:
    from fxlens.api import _HF_KWARGS, PROCESSING_FLAGS, SELF_CHECK_RTOL, _module_path
    from fxlens.pipeline import Context, run_pipeline

    unknown = set(hf_kwargs) - _HF_KWARGS
    if unknown:
        raise TypeError(f"unknown keyword(s) {sorted(unknown)}; fxlens takes "
                        f"{sorted(_HF_KWARGS | {'device', 'dtype', 'self_check', 'on_pass', 'compile'})}")
    if isinstance(source, Captured):
        if not isinstance(source, EncoderCaptured):
            raise TypeError("this Captured is a decoder's; capture encoders with fxlens.capture_encoder")
        if hf_kwargs:
            raise TypeError(f"{sorted(hf_kwargs)} apply when loading; this model is already captured")
        cap = source
    else:
        cap = capture_encoder(source, dtype=dtype, **hf_kwargs)
    internal = cap if not isinstance(source, (Captured, torch.nn.Module)) else None
    hf = cap.hf_model
    ctx = Context(embed_path=_module_path(hf, hf.get_input_embeddings()),
                  unembed_path=_module_path(hf, hf.get_output_embeddings()),
                  flags={f: False for f in PROCESSING_FLAGS})
    # a graph of its own unless nobody else can reach the HF model (loaded here from a path)
    gm = run_pipeline(cap.graph_module(own=cap is not internal), ctx, pipeline=encoder_pipeline(),
                      on_pass=on_pass)
    if self_check:
        _self_check(gm, hf, cap.n_ctx, get_tensor(gm, ctx.spec.embed.args[0].target).shape[0], SELF_CHECK_RTOL)
    device = device or next(hf.parameters()).device
    cfg = make_config(ctx.spec, hf.config, cap.n_ctx, cap.name, dtype, device, arch=type(hf).__name__)
    cfg.attention_dir = "bidirectional"
    cfg.default_prepend_bos = False           # the tokenizer adds [CLS] ... [SEP] itself
    if ctx.spec.unembed is None:
        cfg.d_vocab_out = None                # no MLM head: the output is the residual stream
    model = HookedEncoder(gm, ctx.spec, cfg, tokenizer=cap.tokenizer, processing=ctx.log,
                          pass_results=ctx.results)
    model.hf_config = hf.config
    return model.to(device)


def warn_processing_skipped(flags: dict) -> None:
    on = sorted(f for f, v in flags.items() if v)
    if on:
        warnings.warn(f"fxlens processing skipped: {', '.join(on)} (encoders load unprocessed, as "
                      f"TransformerLens's HookedEncoder does); use encoder_from_pretrained_no_processing",
                      stacklevel=3)
