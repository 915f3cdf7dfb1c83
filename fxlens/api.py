"""`fxlens.from_pretrained*`: the public loaders (fxlens/runtime/build.py does the work)."""

from __future__ import annotations

import torch

from fxlens.errors import NotApplicableError
from fxlens.runtime.build import is_encoder, load
from fxlens.runtime.model import HookedEncoder, HookedModel
from fxlens.runtime.stages import PipelinedModel, join_world

CLASSES = (HookedModel, HookedEncoder)   # what `load` builds: a decoder, an encoder


def _load(source, flags: dict, kind: str, compile: bool, pipeline_stages, pipeline_microbatches, hf_kwargs,
          **options):
    """`load`, with the pipeline-stage options checked here (PipelinedModel sits above the builder)."""
    if pipeline_stages is None:
        if pipeline_microbatches is not None and not is_encoder(source, kind, hf_kwargs):
            raise TypeError("pipeline_microbatches applies with pipeline_stages=K")
        return load(CLASSES, source, flags, kind=kind, compile=compile, **options, **hf_kwargs)
    if is_encoder(source, kind, hf_kwargs):
        raise NotApplicableError("pipeline_stages applies to causal LMs; this checkpoint is an encoder")
    if compile:
        raise NotApplicableError("compile=True with pipeline_stages: stages run their eager graphs; "
                                 "drop one of the two")
    join_world(int(pipeline_stages))          # before the (long) capture: a missing torchrun fails at once
    return load((PipelinedModel, HookedEncoder), source, flags, kind="decoder", compile=False,
                stages=(int(pipeline_stages), pipeline_microbatches), **options, **hf_kwargs)


def encoder_from_pretrained_no_processing(source, *, device=None, dtype=torch.float32,
                                          self_check: bool = True, on_pass=None, compile: bool = False,
                                          **hf_kwargs) -> HookedEncoder:
    """Instrument a BERT-style encoder with TransformerLens's HookedEncoder hook points.

    `source`: a checkpoint folder (loaded as the class its config names, e.g.
    BertForPreTraining or BertModel), a cached hub id, a `PreTrainedModel`, or an
    `EncoderCaptured` from `fxlens.capture_encoder`. Weights are not processed
    (neither are TransformerLens's HookedEncoder's). See `fxlens.discovery.encoder`.
    """
    return load(CLASSES, source, {}, device=device, dtype=dtype, self_check=self_check, on_pass=on_pass,
                compile=compile, kind="encoder", **hf_kwargs)


def from_pretrained_no_processing(source, *, device=None, dtype=torch.float32, self_check: bool = True,
                                  default_prepend_bos: bool | None = None, on_pass=None,
                                  compile: bool = False, kind: str = "auto", pipeline_stages: int | None = None,
                                  pipeline_microbatches: int | None = None, **hf_kwargs) -> HookedModel:
    """Instrument an HF causal LM with TransformerLens hook points, weights unprocessed.

    `source`: a checkpoint folder, a hub id already in the local HF cache, or a
    `PreTrainedModel`. Extra keywords go to `from_pretrained` (`gguf_file`,
    `revision`, ...) or set the tokenizer (`tokenizer=`). `compile=True` is
    `model.compile()`: calls run through torch.compile (see `fxlens.runtime.compiled`).
    A BERT-style checkpoint (an encoder class in `config.architectures`, or a
    masked-LM model type that is not `is_decoder`) is instrumented as
    `encoder_from_pretrained_no_processing` does; `kind="decoder"` / `"encoder"`
    forces one; a checkpoint that is neither is refused (CaptureError).

    `pipeline_stages=K` under `torchrun --nproc-per-node K`: the graph is cut at
    block boundaries into K stages, one per rank, run with
    torch.distributed.pipelining in `pipeline_microbatches` microbatches (default
    K); `device` is this rank's stage device (default its GPU, else the CPU).
    See `fxlens.runtime.stages`.
    """
    return _load(source, {}, kind, compile, pipeline_stages, pipeline_microbatches, hf_kwargs, device=device,
                 dtype=dtype, self_check=self_check, default_prepend_bos=default_prepend_bos, on_pass=on_pass)


def from_pretrained(source, *, fold_ln: bool = True, center_writing_weights: bool = True,
                    center_unembed: bool = True, fold_value_biases: bool = True,
                    refactor_factored_attn_matrices: bool = False, device=None, dtype=torch.float32,
                    self_check: bool = True, default_prepend_bos: bool | None = None, on_pass=None,
                    compile: bool = False, kind: str = "auto", pipeline_stages: int | None = None,
                    pipeline_microbatches: int | None = None, **hf_kwargs) -> HookedModel:
    """Instrument with TransformerLens's weight processing (its defaults: the four
    flags on). Each flag is a compiler pass; one that cannot apply to part of
    the model is skipped there with a warning, and `model.processing` records
    what was applied and which parameters each pass changed. Encoders
    (detected as in `from_pretrained_no_processing`) load unprocessed, with a warning naming the flags skipped."""
    flags = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                 center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                 refactor_factored_attn_matrices=refactor_factored_attn_matrices)
    return _load(source, flags, kind, compile, pipeline_stages, pipeline_microbatches, hf_kwargs, device=device,
                 dtype=dtype, self_check=self_check, default_prepend_bos=default_prepend_bos,
                 on_pass=on_pass)
