"""Capture of encoders (BERT-style): load the class the checkpoint declares, export it.

Capture exports `input_ids` plus the optional inputs the model's forward takes
(`attention_mask`, `token_type_ids`), then routes those through one
`EncoderInputs` module, so the graph -- like a decoder's -- takes `input_ids`
only and every runner (eager, compiled, self-check) calls it the same way. A
call binds a mask or token types for its own duration (as hooks are bound);
unbound, they default to all-ones and all-zeros like HF's.
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from safetensors import SafetensorError

from fxlens.discovery.encoder import INPUTS
from fxlens.errors import CaptureError
from fxlens.frontend import compat
from fxlens.frontend.decoder import (Captured, corrupt_weights_error, functionalise, load_model, n_ctx_of,
                                     own_tensors, plain_graph_module)

aten = torch.ops.aten

OPTIONAL_INPUTS = ("attention_mask", "token_type_ids")


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
