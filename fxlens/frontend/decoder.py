"""Capture: an HF checkpoint -> an exported FX graph with dynamic batch and sequence.

transformers 5 has no fx tracer and `torch.fx.symbolic_trace` fails on its
models; `torch.export.export(strict=False)` keeps `aten.linear`,
`aten.layer_norm`, `aten.softmax` whole and tags every node with the module
that produced it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from safetensors import SafetensorError

from fxlens.frontend import compat
from fxlens.errors import CaptureError


@dataclass
class Captured:
    """A captured checkpoint. Capture is the slow step; one Captured can be
    instrumented many times (`fxlens.from_pretrained(captured, ...)`), each
    time on a fresh copy of the graph."""

    program: torch.export.ExportedProgram
    hf_model: torch.nn.Module   # the original model, for self-checks and weight names
    tokenizer: object | None
    n_ctx: int
    name: str
    info: "CaptureInfo | None" = None   # how torch.export succeeded (see CaptureInfo)

    kind = "decoder"   # "encoder" for fxlens.frontend.encoder.EncoderCaptured
    placed = False   # True where parameters sit on a device map's devices (fxlens.frontend.placement)

    def graph_module(self, own: bool = True) -> fx.GraphModule:
        """A fresh graph taking `(input_ids [batch, pos], attention_mask [batch, pos]
        = None)` -> logits [batch, pos, vocab] (see `decoder_graph`).
        `own=True` (the default) gives it its own copies of the parameters and
        buffers, so no two models built from this capture, nor the HF model,
        share storage; `own=False` shares them (fxlens uses it only when nobody
        else can reach the HF model)."""
        gm = decoder_graph(self.program)
        if self.info is not None:
            gm.meta["fxlens.capture"] = str(self.info)   # dumps show how it was captured
        return own_tensors(gm) if own else gm

    def at_length(self, seq: int, batch: int | None = None) -> "Captured":
        """This model exported for one sequence length (and, if the dynamic export
        does not cover it, one batch size): the per-length fallback."""
        program, info = export_program(self.hf_model, self.n_ctx, seq_len=seq, batch=batch)
        return Captured(program=program, hf_model=self.hf_model, tokenizer=self.tokenizer,
                        n_ctx=self.n_ctx, name=self.name, info=info)

    @property
    def device(self) -> torch.device:
        """Where input ids go."""
        return next(self.hf_model.parameters()).device

    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The original model's logits, for the load-time self-check."""
        return self.hf_model(input_ids.to(self.device), use_cache=False).logits


MASK_INPUT = "attention_mask"
POSITIONS = "fxlens.position_ids"     # meta["custom"] tag of the position ids computed from the mask


def mask_or_ones(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The graph's attention mask: the one given, or all ones (no padding)."""
    return torch.ones_like(input_ids) if attention_mask is None else attention_mask


def decoder_graph(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """The exported program as a plain GraphModule with the signature
    `(input_ids, attention_mask=None)`: the mask placeholder (where the model
    was exported with one) gets the default None, and its readers read
    `mask_or_ones(input_ids, attention_mask)`, so callers that pass token ids
    only (self-checks, harvests, the KV decoder) run the unpadded graph."""
    gm = plain_graph_module(program)
    graph = gm.graph
    mask = next((n for n in graph.nodes if n.op == "placeholder" and n.target == MASK_INPUT), None)
    if mask is None:
        return gm
    ids = next(n for n in graph.nodes if n.op == "placeholder")
    for u in list(mask.users):
        if u.target is torch.ops.aten.sym_size.int:
            u.replace_input_with(mask, ids)               # [batch, pos] like input_ids
    mask.args = (None,)                                   # default value: `attention_mask=None`
    with graph.inserting_after(mask):
        full = graph.call_function(mask_or_ones, (ids, mask))
    full.meta["val"] = mask.meta.get("val")
    mask.replace_all_uses_with(full, delete_user_cb=lambda u: u is not full)
    graph.lint()
    gm.recompile()
    return gm


def plain_graph_module(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """The program as a GraphModule called with plain tensors, returning the
    logits only. `program.module()` flattens inputs and outputs through pytree
    and, unless `check_guards=False`, checks input shapes in a `_guards_fn`
    submodule; fxlens checks shapes itself (`CaptureInfo.covers`). The nodes are
    copied into a fresh `fx.Graph` (which has no pytree codegen), keeping
    `input_ids` and every placeholder that is read (the `use_cache` flag is not),
    without export's runtime metadata asserts (they hold no value and would
    count as users of the tensors site discovery follows)."""
    gm = program.module(check_guards=False)
    graph = fx.Graph()
    outputs = graph.graph_copy(gm.graph, {})
    for node in list(graph.nodes):
        if (node.op == "placeholder" and not node.users and node.target != "input_ids") or \
                (node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default):
            graph.erase_node(node)
    graph.output(outputs[0] if isinstance(outputs, (tuple, list)) else outputs)   # the logits
    _drop_empty_concats(graph)
    graph.lint()
    return fx.GraphModule(gm, graph)


def _drop_empty_concats(graph: fx.Graph) -> None:
    """A `cat` with an operand of static size 0 along its dim is the other operand:
    a KV cache the forward makes for itself and starts empty (XLM builds one even
    with `use_cache=False`) concatenates an empty past to each k and v, which
    would read as a computation between the projection and QK^T. The cat becomes
    `contiguous` of that operand: its output is a fresh contiguous tensor, and a
    `view` after it (GPT-NeoX-Japanese's rotary cat of a permuted q with an
    empty pass-through part) fails on a permuted one. The empty operands, left
    unused, go too."""
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.cat.default:
            continue
        parts, dim = node.args[0], (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
        kept = [a for a in parts if not _empty_part(a, dim)]
        if len(kept) == 1 and len(parts) > 1 and kept[0].meta.get("val") is not None \
                and kept[0].meta["val"].shape == node.meta["val"].shape:
            with graph.inserting_before(node):
                dense = graph.call_function(torch.ops.aten.contiguous.default, (kept[0],))
            dense.meta.update(node.meta)
            node.replace_all_uses_with(dense)
            graph.erase_node(node)
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and not node.users and _empty_part(node, 0):
            graph.erase_node(node)


def _empty_part(node, dim: int) -> bool:
    """Whether `node` is a tensor of static size 0 along `dim` -- or a 1-d [0],
    which `cat` skips whatever the dim."""
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(v, torch.Tensor):
        return False
    s = v.shape
    if len(s) == 1 and isinstance(s[0], int) and s[0] == 0:
        return True
    return -len(s) <= dim < len(s) and isinstance(s[dim], int) and s[dim] == 0


def has_mask_input(gm: fx.GraphModule) -> bool:
    """Whether the graph takes an attention mask (the HF forward names `attention_mask`)."""
    return any(n.op == "placeholder" and n.target == MASK_INPUT for n in gm.graph.nodes)


def own_tensors(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every tensor a `get_attr` reads (parameters, buffers, constants)
    with a copy, in place. Tensors shared between targets (tied embeddings) stay
    shared: one copy each."""
    copies: dict[int, torch.Tensor] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        prefix, _, attr = node.target.rpartition(".")
        owner = gm.get_submodule(prefix) if prefix else gm
        t = getattr(owner, attr)
        if not isinstance(t, torch.Tensor):
            continue
        if id(t) not in copies:
            with torch.no_grad():
                c = t.detach().clone()
            copies[id(t)] = torch.nn.Parameter(c, requires_grad=t.requires_grad) \
                if isinstance(t, torch.nn.Parameter) else c
        setattr(owner, attr, copies[id(t)])   # a parameter stays one, a buffer a buffer
    return gm


def n_ctx_of(config) -> int:
    keys = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "max_seq_len",
            "seq_length")
    for key in keys:
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    warnings.warn(f"the config names no context length (none of {', '.join(keys)}); fxlens assumes "
                  f"n_ctx=2048 (inputs longer than the model was trained on are not refused)",
                  stacklevel=3)
    return 2048


def checkpoint_kind(source, hf_kwargs: dict) -> str:
    """'decoder' (a causal LM) or 'encoder' (BERT-style), from what the checkpoint
    declares: the class of an in-memory model or `config.architectures`, read
    against transformers' own auto mappings. A model type with both kinds (BERT,
    RoBERTa, ...) is an encoder unless it declares a causal-LM class or
    `is_decoder`. Raises CaptureError for a checkpoint that is neither."""
    from transformers import AutoConfig, PreTrainedModel
    from transformers.models.auto import modeling_auto as auto

    if isinstance(source, Captured):
        return source.kind
    if isinstance(source, PreTrainedModel):
        config, declared = source.config, [type(source).__name__]
    elif isinstance(source, (str, os.PathLike)):
        keys = ("revision", "trust_remote_code", "cache_dir", "subfolder", "token", "gguf_file")
        kwargs = {k: hf_kwargs[k] for k in keys if k in hf_kwargs}
        if not os.path.isdir(str(source)):
            kwargs.setdefault("local_files_only", True)
        try:
            config = AutoConfig.from_pretrained(str(source), **kwargs)
        except Exception:   # the loader reports an unreadable checkpoint with its own error
            return "decoder"
        declared = list(getattr(config, "architectures", None) or ())
    else:
        return "decoder"
    causal = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    masked = auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    model_type = getattr(config, "model_type", None)
    if any(name in set(causal.values()) for name in declared):
        return "decoder"
    if not getattr(config, "is_encoder_decoder", False):
        if model_type in masked and (declared or not getattr(config, "is_decoder", False)):
            return "encoder"
        if model_type in causal:
            return "decoder"
    raise CaptureError(
        f"{getattr(source, 'name_or_path', None) or source!s}: model type {model_type!r} declaring "
        f"{declared or 'no architecture'} is neither a causal LM (a class of transformers' "
        f"MODEL_FOR_CAUSAL_LM_MAPPING) nor a BERT-style encoder"
        f"{' (it is an encoder-decoder model)' if getattr(config, 'is_encoder_decoder', False) else ''}; "
        f"fxlens instruments those two kinds. Pass kind='decoder' or kind='encoder' to force one.")


def _model_class(source: str, kind: str, hf_kwargs: dict):
    """The transformers class to load a checkpoint folder or cached hub id with: a
    decoder's causal-LM class; for an encoder the class its config declares
    (`config.architectures`), else its masked-LM class, else its base model."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if kind == "decoder":
        return AutoModelForCausalLM
    cfg_kwargs = {k: hf_kwargs[k] for k in ("revision", "trust_remote_code", "cache_dir",
                                             "local_files_only", "subfolder", "token") if k in hf_kwargs}
    config = AutoConfig.from_pretrained(source, **cfg_kwargs)
    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return AutoModelForMaskedLM if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else AutoModel


def load_model(source, dtype=torch.float32, kind: str = "decoder", **hf_kwargs):
    """Load a `PreTrainedModel` from a folder, a hub id already in the local cache,
    or take an in-memory one, as a causal LM (`kind="decoder"`) or a BERT-style
    encoder (`kind="encoder"`, see `_model_class`). Returns (model, tokenizer or
    None, name)."""
    from transformers import PreTrainedModel

    what = "a causal LM" if kind == "decoder" else "an encoder"
    tokenizer = hf_kwargs.pop("tokenizer", None)
    if isinstance(source, PreTrainedModel):
        model, name = source, getattr(source, "name_or_path", "") or type(source).__name__
        tok_source = name if name and os.path.isdir(name) else None
    elif isinstance(source, (str, os.PathLike)):
        source = str(source)
        name = source
        if not os.path.isdir(source) and not hf_kwargs.get("gguf_file"):
            hf_kwargs.setdefault("local_files_only", True)
        try:
            model = _model_class(source, kind, hf_kwargs).from_pretrained(
                source, attn_implementation="eager", dtype=dtype, **hf_kwargs)
        except SafetensorError as exc:
            raise corrupt_weights_error(source, exc) from exc
        except (OSError, ValueError) as exc:
            raise CaptureError(
                f"cannot load {source!r} as {what}: {exc}. Pass a checkpoint folder, a hub id "
                f"that is already in the local HF cache, or a PreTrainedModel.") from exc
        tok_source = source
    else:
        raise CaptureError(f"cannot load {what} from {type(source).__name__}; pass a path, "
                           f"a cached hub id or a transformers PreTrainedModel")
    if tokenizer is None and tok_source is not None:
        tokenizer = load_tokenizer(tok_source, hf_kwargs)
    model.eval()
    # site discovery needs the softmax as a node (SDPA / flash kernels hide it)
    model.set_attn_implementation("eager")
    return model, tokenizer, name


def corrupt_weights_error(source: str, exc: Exception) -> CaptureError:
    """The error for a weights file safetensors cannot read, naming the file:
    each *.safetensors in the checkpoint folder is opened to find which."""
    from safetensors import safe_open

    bad = []
    if os.path.isdir(source):
        for name in sorted(os.listdir(source)):
            if name.endswith(".safetensors"):
                try:
                    with safe_open(os.path.join(source, name), "pt"):
                        pass
                except Exception:   # any failure to open is what we report
                    bad.append(name)
    what = ", ".join(bad) if bad else "a .safetensors weights file"
    return CaptureError(
        f"cannot load {source!r}: {what} is corrupt or truncated ({_first_line(exc)}). Download the "
        f"checkpoint again, or re-save it from a working copy with model.save_pretrained(...)")


def load_tokenizer(tok_source: str, hf_kwargs: dict):
    """The checkpoint's tokenizer, or None (with a warning) where it has none."""
    from transformers import AutoTokenizer

    tok_kwargs = {k: hf_kwargs[k] for k in ("gguf_file", "local_files_only", "cache_dir", "revision",
                                            "token", "trust_remote_code") if k in hf_kwargs}
    try:
        return AutoTokenizer.from_pretrained(tok_source, **tok_kwargs)
    except Exception as exc:  # a checkpoint without tokenizer files is fine: tokens still work
        warnings.warn(f"no tokenizer loaded from {tok_source!r} ({type(exc).__name__}); "
                      f"pass token ids, or tokenizer=...", stacklevel=4)
        return None


@dataclass
class CaptureInfo:
    """How `torch.export` captured the model (shown as `model.capture_info` and in dumps).

    method: "dims" (named batch/seq Dims), "dynamic" / "auto" (seq as
    `Dim.DYNAMIC` / `Dim.AUTO`, torch.export choosing its range), or
    "per-length" (sequence length static: one export per length, made on first
    use and cached). seq_range / batch_range: the lengths and batch sizes the
    graph is valid for (inclusive; None = unbounded); `attempts` lists the
    methods that failed before, with their error. `pad_masked`: the pad token id
    where the model, given no attention mask, masks its pad tokens itself (the
    graph takes the mask as an input, so a call without one that holds pad
    tokens is refused: see `HookedModel._padding_mask`)."""

    method: str
    input_name: str
    seq_range: tuple
    batch_range: tuple
    attempts: list
    pad_masked: int | None = None

    def covers(self, batch: int, seq: int) -> bool:
        inside = lambda x, r: r[0] <= x and (r[1] is None or x <= r[1])  # noqa: E731
        return inside(batch, self.batch_range) and inside(seq, self.seq_range)

    def __str__(self) -> str:
        fmt = lambda r: f"{r[0]}..{'' if r[1] is None else r[1]}"  # noqa: E731
        failed = "".join(f"; {m} failed ({why})" for m, why in self.attempts)
        return f"{self.method} (seq {fmt(self.seq_range)}, batch {fmt(self.batch_range)}){failed}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"
    if "DataDependent" in type(exc).__name__:
        # a Python branch or loop on a tensor's values (kolibri1_1's indexer loops over
        # mask.unique().tolist()): name the model's line that asks for them
        import traceback
        torch_dir = os.path.dirname(torch.__file__) + os.sep
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(torch_dir)]
        if frames:
            f = frames[-1]
            line += (f" (control flow on tensor values at {os.path.basename(f.filename)}:{f.lineno} "
                     f"in {f.name}: {(f.line or '').strip()[:80]})")
    return line


def _forward_params(model) -> dict:
    import inspect
    return dict(inspect.signature(model.forward).parameters)


def _export_call(model):
    """(name of the forward's token argument, kwargs, their dynamic-shape spec).
    `use_cache=False` is passed only where the forward names it: torch.export
    keys the spec by signature, and a forward taking it through **kwargs reads
    `config.use_cache` instead (which `export_graph` turns off)."""
    params = _forward_params(model)
    positional = [n for n, p in params.items()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    name = "input_ids" if "input_ids" in params else (positional[0] if positional else "input_ids")
    if "use_cache" in params:
        return name, {"use_cache": False}, {"use_cache": None}
    return name, {}, {}


def _counts_positions_from_zero(model) -> bool:
    """Whether the model's own positions (no `position_ids` passed) are 0, 1, ...:
    RoBERTa-style models count from `padding_idx + 1`, and giving them 0-based ids
    would silently move every position. Checked on a short probe (skipped on the
    meta device, where nothing runs)."""
    params = list(model.parameters())
    if not params or params[0].device.type == "meta":
        return True
    vocab = model.get_input_embeddings().weight.shape[0]
    probe = torch.randint(0, vocab, (1, 6), generator=torch.Generator().manual_seed(0))
    pad = getattr(model.config, "pad_token_id", None)
    if isinstance(pad, int):
        probe[probe == pad] = (pad + 1) % vocab
    probe = probe.to(params[0].device)
    with torch.no_grad(), _no_cache_config(model):
        own = model(probe)[0]
        given = model(probe, position_ids=torch.arange(6, device=probe.device)[None])[0]
    return bool(torch.allclose(own, given, rtol=1e-5, atol=1e-6))   # float32 rounding only


@contextlib.contextmanager
def _positions_from_mask(model):
    """While exporting, `position_ids` (where the forward takes them and the
    caller passes none) are computed from the attention mask:

        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)     # [batch, pos]

    so a left-padded row gets the positions 0, 1, ... at its real tokens, as
    the same prompt run alone (HF itself counts from 0 at the first column).
    The nodes are tagged `meta["custom"][POSITIONS]` (the KV decoder shifts
    them). Yields whether positions come from the mask."""
    if "position_ids" not in _forward_params(model) or not _counts_positions_from_zero(model):
        yield False
        return

    def pre_hook(module, args, kwargs):
        mask = kwargs.get(MASK_INPUT)
        if mask is not None and kwargs.get("position_ids") is None:
            with torch.fx.traceback.preserve_node_meta(), torch.fx.traceback.annotate({POSITIONS: True}):
                kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return args, kwargs

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield True
    finally:
        handle.remove()


@contextlib.contextmanager
def _no_cache_config(model):
    """`config.use_cache = False` for the duration (a KV cache is not a graph output)."""
    cfgs = [c for c in (model.config, getattr(model.config, "get_text_config", lambda: None)())
            if c is not None and hasattr(c, "use_cache")]
    saved = [c.use_cache for c in cfgs]
    try:
        for c in cfgs:
            c.use_cache = False
        yield
    finally:
        for c, v in zip(cfgs, saved):
            c.use_cache = v


def _range_of(ep, size) -> tuple:
    """(min, max) a (symbolic) input size may take in `ep`; max None = unbounded. A
    SymInt whose expression is a number is a size `Dim.AUTO` specialised (Mamba's scan
    unrolled over the probe's positions): that one size only."""
    if isinstance(size, int) or size.node.expr.is_number:
        return (int(size), int(size))
    r = ep.range_constraints.get(size.node.expr)
    if r is None:
        return (1, None)
    hi = int(r.upper) if r.upper.is_finite else None
    return (int(r.lower), hi)


# the inputs besides the token ids that each kind exports where the forward takes them,
# with the value of a probe row (no padding, one segment)
OPTIONAL_INPUTS = {"decoder": (MASK_INPUT,), "encoder": (MASK_INPUT, "token_type_ids")}
_PROBE = {MASK_INPUT: torch.ones_like, "token_type_ids": torch.zeros_like}


def export_program(model, n_ctx: int, seq_len: int | None = None, batch: int | None = None,
                   kind: str = "decoder"):
    """Export `model(input_ids, <OPTIONAL_INPUTS[kind]>, use_cache=False)` with
    dynamic batch and sequence (each optional input the forward takes, [batch,
    pos] like the ids), then functionalise it (`functionalise`).

    A decoder's position ids (where the forward takes them) are computed from
    the mask (`_positions_from_mask`), and it falls back in steps when
    torch.export cannot keep the sequence length fully dynamic: named Dims,
    then `Dim.DYNAMIC` and `Dim.AUTO` for the sequence (torch.export narrows
    its range), then a static sequence length; each step with the mask first,
    without it (padding then refused) where that fails. With `seq_len` only
    that static export is made (the per-length fallback). An encoder keeps its
    own positions (BERT counts from the first column, padded or not) and is
    exported with named Dims only (it has no per-length graphs).
    Returns (ExportedProgram, CaptureInfo)."""
    batch_dim, seq = compat.export_dims(n_ctx)
    vocab = model.get_input_embeddings().weight.shape[0]
    length = seq_len or min(8, n_ctx)
    probe = torch.randint(0, vocab, (batch or 2, length), generator=torch.Generator().manual_seed(0))
    probe = probe.to(next(model.parameters()).device)
    name, kwargs, kw_dims = _export_call(model)
    extra = tuple(k for k in OPTIONAL_INPUTS[kind] if k in _forward_params(model) and k != name)
    seq_max = max(2, n_ctx)
    steps = [("dims", {0: batch_dim, 1: seq}),
             ("dynamic", {0: batch_dim, 1: torch.export.Dim.DYNAMIC(min=1, max=seq_max)}),
             ("auto", {0: torch.export.Dim.AUTO(min=1, max=4096), 1: torch.export.Dim.AUTO(min=1, max=seq_max)}),
             ("per-length", {0: torch.export.Dim.AUTO(min=1, max=4096)})]
    if seq_len is not None:
        steps = [("per-length", {} if batch else steps[-1][1])]
    decoder = kind == "decoder"
    if not decoder:
        steps = steps[:1]
    attempts = []
    # a decoder's mask: an input first, left out where that fails
    tries = [(m, d, given) for m, d in steps for given in ((extra, ()) if decoder and extra else (extra,))]
    for method, dims, given in tries:
        inputs, shapes = {name: probe, **kwargs}, {name: dims, **kw_dims}
        for k in given:
            inputs[k], shapes[k] = _PROBE[k](probe), dims
        from_mask = decoder and MASK_INPUT in given
        try:
            with torch.no_grad(), _no_cache_config(model), \
                    (_positions_from_mask(model) if from_mask else contextlib.nullcontext()):
                ep = torch.export.export(model, (), kwargs=inputs, dynamic_shapes=shapes, strict=False)
        except Exception as exc:
            attempts.append((method + (" with the mask" if decoder and given else ""), _first_line(exc)))
            continue
        ph = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == name) \
            if any(n.op == "placeholder" and n.name == name for n in ep.graph.nodes) else None
        if ph is None:
            ph = [n for n in ep.graph.nodes if n.op == "placeholder"
                  and n.meta.get("val") is not None and n.meta["val"].dim() == 2][0]
        b, s = ph.meta["val"].shape
        seq_range, batch_range = _range_of(ep, s), _range_of(ep, b)
        if method != "per-length" and seq_range[0] == seq_range[1]:
            attempts.append((method, f"sequence length specialised to {seq_range[0]}"))
            continue
        pad = _masks_pad_tokens(model, probe, {name: probe, **kwargs}) if from_mask and seq_len is None else None
        return functionalise(ep), CaptureInfo(method=method, input_name=name, seq_range=seq_range,
                                              batch_range=batch_range, attempts=attempts, pad_masked=pad)
    tried = "; ".join(f"{m}: {why}" for m, why in attempts)
    raise CaptureError(
        f"torch.export could not capture {type(model).__name__} ({tried}). fxlens needs a model "
        f"that torch.export can capture from its input ids"
        f"{'' if decoder else ' with dynamic batch and sequence length'}.")


def _masks_pad_tokens(model, probe: torch.Tensor, inputs: dict) -> int | None:
    """`config.pad_token_id` where the model, given no attention mask, masks its pad
    tokens itself (XLM counts the tokens that are not pad_index and zeroes the
    stream after them): on a probe whose last columns are pad tokens, its logits
    with no mask differ from those with a mask of ones. The graph fxlens exports
    takes the mask as an input and gives the ones-mask numbers without one."""
    pad = getattr(model.config, "pad_token_id", None)
    if not isinstance(pad, int) or any(p.is_meta for p in model.parameters()) \
            or not 0 <= pad < model.get_input_embeddings().weight.shape[0]:
        return None
    ids = probe.clone()
    ids[:, -2:] = pad
    inputs = {k: (ids if v is probe else v) for k, v in inputs.items()}
    with torch.no_grad(), _no_cache_config(model):
        own = model(**inputs).logits
        ones = model(**inputs, attention_mask=torch.ones_like(ids)).logits
    return pad if not torch.equal(own, ones) else None


def functionalise(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program without in-place ops. Non-strict export keeps them (Falcon's
    `mlp_output += attention_output`, a write through a view such as
    `x.view(b, s, h, d)[..., :k].mul_(c)`); a hook on such a value would see it
    change after it ran, and a rewrite that renamed `add_` to `add` would lose
    a write made through a view. `run_decompositions({})` functionalises the
    program (views of a written tensor become `slice_scatter` / `select_scatter`
    of a fresh value) and, with an empty table, decomposes nothing else:
    `aten.linear`, `layer_norm`, `softmax` and `matmul` stay whole. A program
    with no in-place op is already functional and kept as exported (the retrace
    costs more than the export itself); one whose every in-place op writes a
    value nothing else reads (`_private_write`) gets each replaced by its
    out-of-place op, which computes the same -- the retrace took most of a
    capture's time for such a model (Gemma 4: 4 s of 7)."""
    writes = [n for n in ep.graph.nodes if compat.mutates(n)]
    if not writes:
        return ep
    if not all(_private_write(n) for n in writes):
        return ep.run_decompositions({})
    for n in writes:
        n.target = _out_of_place(n.target)
    _drop_identities(ep.graph)
    ep.graph_module.recompile()
    return ep


def _drop_identities(graph: fx.Graph) -> None:
    """Remove the ops the retrace of `run_decompositions` would drop as returning
    their input: a cast to the dtype (and device) the value has, eval-mode
    dropout. The retraced graphs of models with in-place ops never held them;
    their out-of-place rewrite should not either."""
    aten = torch.ops.aten
    for n in list(graph.nodes):
        if n.op != "call_function" or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        x, v, vx = n.args[0], n.meta.get("val"), n.args[0].meta.get("val")
        if not isinstance(v, torch.Tensor) or not isinstance(vx, torch.Tensor):
            continue
        same = v.dtype == vx.dtype and v.device == vx.device and v.shape == vx.shape
        names = [a.name for a in n.target._schema.arguments] if hasattr(n.target, "_schema") else []
        copy = n.kwargs.get("copy", n.args[names.index("copy")] if "copy" in names[:len(n.args)] else False)
        if (n.target in (aten.to.dtype, aten.to.device, aten.to.dtype_layout) and same and not copy) \
                or (n.target is aten.dropout.default and len(n.args) > 2 and n.args[2] is False and same):
            n.replace_all_uses_with(x)
            graph.erase_node(n)


def _out_of_place(op):
    """`aten.mul_.Tensor` -> `aten.mul.Tensor` (None where there is none)."""
    name = op._schema.name.split("::")[-1]
    packet = getattr(torch.ops.aten, name[:-1], None) if name.endswith("_") else None
    return getattr(packet, op._overloadname, None) if packet is not None else None


def _private_write(node: fx.Node) -> bool:
    """An in-place op whose out-of-place form computes the same value: it writes
    its first argument only, and that argument is a fresh tensor (made by an op
    returning no view of another) read by nothing but this op -- no alias of it,
    and no reader before the write."""
    if _out_of_place(node.target) is None or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    written = [i for i, a in enumerate(node.target._schema.arguments)
               if a.alias_info is not None and a.alias_info.is_write]
    x = node.args[0]
    return (written == [0] and x.op == "call_function" and isinstance(x.target, torch._ops.OpOverload)
            and all(r.alias_info is None for r in x.target._schema.returns)
            and not compat.mutates(x) and list(x.users) == [node])


def export_graph(model, n_ctx: int) -> torch.export.ExportedProgram:
    """`export_program` without the CaptureInfo."""
    return export_program(model, n_ctx)[0]
