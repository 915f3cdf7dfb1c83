"""`fxlens.capture`: a causal LM loaded and exported, in memory or placed by a device map."""

from __future__ import annotations

import torch

from fxlens.errors import CaptureError
from fxlens.frontend.decoder import Captured, checkpoint_kind, export_program, load_model, n_ctx_of
from fxlens.frontend.placement import capture_placed


def capture(source, dtype=torch.float32, device_map=None, max_memory=None, offload_folder=None,
            kind: str = "auto", **hf_kwargs) -> Captured:
    """Load and export a causal LM. With `device_map` (accelerate's forms: "auto",
    a device, {module prefix: device | "disk"}) the model is exported on the
    meta device and each parameter is then loaded where the map puts it
    (`fxlens.frontend.placement`); the full set of weights is never materialised. A
    BERT-style checkpoint is refused (it is `fxlens.capture_encoder`'s) unless
    `kind="decoder"` forces the causal-LM class."""
    if kind == "auto" and checkpoint_kind(source, hf_kwargs) == "encoder":
        raise CaptureError(
            f"{getattr(source, 'name_or_path', None) or source!s} is a BERT-style encoder "
            f"(bidirectional attention); as a causal LM it would be causal-masked. Capture it with "
            f"fxlens.capture_encoder(...), or load it with fxlens.from_pretrained(...), which "
            f"gives TransformerLens's HookedEncoder sites; kind='decoder' forces a causal LM.")
    if device_map is not None or max_memory is not None or offload_folder is not None:
        return capture_placed(source, device_map, max_memory=max_memory, offload_folder=offload_folder,
                              dtype=dtype, **hf_kwargs)
    model, tokenizer, name = load_model(source, dtype=dtype, **hf_kwargs)
    n_ctx = n_ctx_of(model.config)
    program, info = export_program(model, n_ctx)
    return Captured(program=program, hf_model=model, tokenizer=tokenizer, n_ctx=n_ctx, name=name, info=info)
