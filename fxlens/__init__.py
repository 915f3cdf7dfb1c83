"""fxlens: TransformerLens hooks on any HuggingFace checkpoint, by graph rewriting."""

from __future__ import annotations

import torch

from .cache import ActivationCache
from .capture import capture
from .config import make_config
from .errors import (CaptureError, ContextLengthError, FxlensError, HookReturnError, PassError,
                     ProcessingError, SelfCheckError, UnknownHookError, UnmappableModelError)
from .model import HookedModel
from .names import act_name
from .pipeline import Context, run_pipeline

__all__ = ["from_pretrained", "from_pretrained_no_processing", "HookedModel", "ActivationCache",
           "act_name", "FxlensError", "CaptureError", "UnmappableModelError", "UnknownHookError",
           "HookReturnError", "ContextLengthError", "SelfCheckError", "ProcessingError", "PassError"]

PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
_HF_KWARGS = {"gguf_file", "revision", "trust_remote_code", "cache_dir", "local_files_only",
              "subfolder", "token", "tokenizer"}

# Self-check tolerance: exposing norms turns x*rsqrt(v) into x/sqrt(v) and
# LayerNorm into explicit ops, which moves float32 logits by ~1e-6 of their
# size; 1e-4 of the largest logit separates that from a wrong rewrite.
SELF_CHECK_RTOL = 1e-4


def _module_path(model: torch.nn.Module, module) -> str | None:
    if module is None:
        return None
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def _self_check(gm, hf_model, n_ctx: int, d_vocab: int) -> float:
    probe = torch.randint(0, d_vocab, (2, min(7, n_ctx)), generator=torch.Generator().manual_seed(1))
    probe = probe.to(next(hf_model.parameters()).device)
    with torch.no_grad():
        want = hf_model(probe, use_cache=False).logits
        got = gm(probe)
    err = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), 1.0)
    if not err <= SELF_CHECK_RTOL * scale:
        raise SelfCheckError(
            f"the instrumented graph's logits differ from the original model's by {err:.3g} "
            f"(largest logit {scale:.3g}) on a probe input; fxlens refuses to return wrong numbers. "
            f"Please report this model; meanwhile use the HF model directly.")
    return err


def from_pretrained_no_processing(source, *, device=None, dtype=torch.float32, self_check: bool = True,
                                  default_prepend_bos: bool | None = None, on_pass=None,
                                  **hf_kwargs) -> HookedModel:
    """Instrument an HF causal LM with TransformerLens hook points, weights unprocessed.

    `source`: a checkpoint folder, a hub id already in the local HF cache, or a
    `PreTrainedModel`. Extra keywords go to `from_pretrained` (`gguf_file`,
    `revision`, ...) or set the tokenizer (`tokenizer=`).
    """
    unknown = set(hf_kwargs) - _HF_KWARGS
    if unknown:
        raise TypeError(f"unknown keyword(s) {sorted(unknown)}; fxlens takes "
                        f"{sorted(_HF_KWARGS | {'device', 'dtype', 'self_check', 'default_prepend_bos'})}")
    cap = capture(source, dtype=dtype, **hf_kwargs)
    hf = cap.hf_model
    ctx = Context(embed_path=_module_path(hf, hf.get_input_embeddings()),
                  unembed_path=_module_path(hf, hf.get_output_embeddings()))
    gm = run_pipeline(cap.gm, ctx, on_pass=on_pass)
    if self_check:
        _self_check(gm, hf, cap.n_ctx, ctx.spec.d_vocab)
    device = device or next(hf.parameters()).device
    cfg = make_config(ctx.spec, hf.config, cap.n_ctx, cap.name, dtype, device, arch=type(hf).__name__)
    if default_prepend_bos is not None:
        cfg.default_prepend_bos = default_prepend_bos
    model = HookedModel(gm, ctx.spec, cfg, tokenizer=cap.tokenizer,
                        processing={f: False for f in PROCESSING_FLAGS}, pass_results=ctx.results)
    model.hf_config = hf.config
    return model.to(device)


def from_pretrained(source, *, fold_ln: bool = True, center_writing_weights: bool = True,
                    center_unembed: bool = True, fold_value_biases: bool = True, **kwargs) -> HookedModel:
    """TransformerLens's default: weights processed. Not built yet: ask for no
    processing with `from_pretrained_no_processing` (or all four flags False)."""
    asked = {k: v for k, v in dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                    center_unembed=center_unembed,
                                    fold_value_biases=fold_value_biases).items() if v}
    if asked:
        raise ProcessingError(
            f"weight processing ({', '.join(asked)}) is not available yet in this fxlens; "
            f"use fxlens.from_pretrained_no_processing(...) or pass these flags as False")
    return from_pretrained_no_processing(source, **kwargs)
