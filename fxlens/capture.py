"""Capture: an HF checkpoint -> an exported FX graph with dynamic batch and sequence.

transformers 5 has no fx tracer and `torch.fx.symbolic_trace` fails on its
models; `torch.export.export(strict=False)` keeps `aten.linear`,
`aten.layer_norm`, `aten.softmax` whole and tags every node with the module
that produced it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from . import _compat
from .errors import CaptureError


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

    placed = False   # True where parameters sit on a device map's devices (fxlens.placement)

    def graph_module(self, own: bool = True) -> fx.GraphModule:
        """A fresh graph taking `input_ids` [batch, pos] -> logits [batch, pos, vocab].
        `own=True` (the default) gives it its own copies of the parameters and
        buffers, so no two models built from this capture, nor the HF model,
        share storage; `own=False` shares them (fxlens uses it only when nobody
        else can reach the HF model)."""
        gm = _compat.plain_graph_module(self.program.module())
        return own_tensors(gm) if own else gm

    @property
    def device(self) -> torch.device:
        """Where input ids go."""
        return next(self.hf_model.parameters()).device

    def reference_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The original model's logits, for the load-time self-check."""
        return self.hf_model(input_ids.to(self.device), use_cache=False).logits


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
        c = copies[id(t)]
        if attr in owner._parameters:
            owner._parameters[attr] = c
        elif attr in owner._buffers:
            owner._buffers[attr] = c
        else:
            setattr(owner, attr, c)
    return gm


def n_ctx_of(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def load_model(source, dtype=torch.float32, **hf_kwargs):
    """Load a `PreTrainedModel` from a folder, a hub id already in the local cache,
    or take an in-memory one. Returns (model, tokenizer or None, name)."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

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
            model = AutoModelForCausalLM.from_pretrained(
                source, attn_implementation="eager", dtype=dtype, **hf_kwargs)
        except (OSError, ValueError) as exc:
            raise CaptureError(
                f"cannot load {source!r} as a causal LM: {exc}. Pass a checkpoint folder, a hub id "
                f"that is already in the local HF cache, or a PreTrainedModel.") from exc
        tok_source = source
    else:
        raise CaptureError(f"cannot load a model from {type(source).__name__}; pass a path, "
                           f"a cached hub id or a transformers PreTrainedModel")
    if tokenizer is None and tok_source is not None:
        tokenizer = load_tokenizer(tok_source, hf_kwargs)
    model.eval()
    _compat.set_eager_attention(model)
    return model, tokenizer, name


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


def export_graph(model, n_ctx: int) -> torch.export.ExportedProgram:
    """Export `model(input_ids, use_cache=False)` with dynamic batch and sequence."""
    batch, seq = _compat.export_dims(n_ctx)
    vocab = model.get_input_embeddings().weight.shape[0]
    probe = torch.randint(0, vocab, (2, min(8, n_ctx)), generator=torch.Generator().manual_seed(0))
    probe = probe.to(next(model.parameters()).device)
    try:
        with torch.no_grad():
            ep = torch.export.export(
                model, (probe,), kwargs={"use_cache": False},
                dynamic_shapes={"input_ids": {0: batch, 1: seq}, "use_cache": None}, strict=False)
    except Exception as exc:
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. fxlens needs a model that exports "
            f"with dynamic batch and sequence length.") from exc
    return ep


def capture(source, dtype=torch.float32, device_map=None, max_memory=None, offload_folder=None,
            **hf_kwargs) -> Captured:
    """Load and export `source`. With `device_map` (accelerate's forms: "auto",
    a device, {module prefix: device | "disk"}) the model is exported on the
    meta device and each parameter is then loaded where the map puts it
    (`fxlens.placement`); the full set of weights is never materialised."""
    if device_map is not None or max_memory is not None or offload_folder is not None:
        from .placement import capture_placed

        return capture_placed(source, device_map, max_memory=max_memory, offload_folder=offload_folder,
                              dtype=dtype, **hf_kwargs)
    model, tokenizer, name = load_model(source, dtype=dtype, **hf_kwargs)
    n_ctx = n_ctx_of(model.config)
    program = export_graph(model, n_ctx)
    return Captured(program=program, hf_model=model, tokenizer=tokenizer, n_ctx=n_ctx, name=name)
