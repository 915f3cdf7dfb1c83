"""Capture of encoders (BERT-style): the decoder's load and export (kind="encoder"), then inputs routed.

Capture exports `input_ids` plus the optional inputs the model's forward takes
(`attention_mask`, `token_type_ids`), then routes those through one
`EncoderInputs` module, so the graph -- like a decoder's -- takes `input_ids`
only and every runner (eager, compiled, self-check) calls it the same way. A
call binds a mask or token types for its own duration (as hooks are bound);
unbound, they default to all-ones and all-zeros like HF's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from fxlens.discovery.encoder import INPUTS
from fxlens.frontend.decoder import (Captured, export_program, load_model, n_ctx_of, own_tensors,
                                     plain_graph_module)

aten = torch.ops.aten


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


def capture_encoder(source, dtype=torch.float32, **hf_kwargs) -> EncoderCaptured:
    """Load (the class the checkpoint declares, else its masked LM, else its base
    model) and export an encoder: `load_model` and `export_program` with kind="encoder"."""
    model, tokenizer, name = load_model(source, dtype=dtype, kind="encoder", **hf_kwargs)
    n_ctx = n_ctx_of(model.config)
    program, info = export_program(model, n_ctx, kind="encoder")
    return EncoderCaptured(program=program, hf_model=model, tokenizer=tokenizer, n_ctx=n_ctx, name=name,
                           info=info)
