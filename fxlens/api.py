"""The builders behind `fxlens.from_pretrained*`: capture, run the pipeline, self-check, wrap."""

from __future__ import annotations

import warnings

import torch

from fxlens.interp.cache import ActivationCache
from fxlens.frontend.decoder import Captured, capture, checkpoint_kind
from fxlens.discovery.config import make_config
from fxlens.runtime.encoder import EncoderCaptured, HookedEncoder, build_encoder, capture_encoder, warn_processing_skipped
from fxlens.errors import (CaptureError, ContextLengthError, FxlensError, HookReturnError, InputError, PassError,
                     HarvestError, NotApplicableError, PaddingError, ProcessingError, SAEError, SelfCheckError,
                     UnknownHookError, UnmappableModelError)
from fxlens.tools.harvesting import harvest
from fxlens.runtime.model import HookedModel
from fxlens.discovery.names import act_name
from fxlens.discovery.names import is_opt_in as is_opt_in_name
from fxlens.pipeline import Context, run_pipeline
from fxlens.runtime.stages import PipelinedModel, join_world


PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                    "refactor_factored_attn_matrices")
_HF_KWARGS = {"gguf_file", "revision", "trust_remote_code", "cache_dir", "local_files_only",
              "subfolder", "token", "tokenizer", "device_map", "max_memory", "offload_folder"}

# Self-check tolerance: exposing norms turns x*rsqrt(v) into x/sqrt(v) and
# LayerNorm into explicit ops, which moves float32 logits by ~1e-6 of their
# size; 1e-4 of the largest logit separates that from a wrong rewrite.
SELF_CHECK_RTOL = 1e-4
# In bfloat16 / float16 rounding dominates: the folded weights w*a are rounded to
# the dtype once more (<= eps/2 each) and activations round at other points than
# HF's, so processed and HF log-probs differ by about as much as HF's own bf16 run
# differs from its float32 one: <= 3 eps of the largest log-prob on the tiny test
# models (eps = 2^-7 bf16, 2^-10 fp16). 8 eps leaves room for deeper models; a
# wrong fold (a norm weight of 1 +- 0.1 dropped) moves them by ~30 eps.
LOW_PRECISION_EPS = 8


def self_check_rtol(dtype: torch.dtype) -> float:
    """The relative tolerance of the self-check for a model computing in `dtype`."""
    return max(SELF_CHECK_RTOL, LOW_PRECISION_EPS * torch.finfo(dtype).eps)


def _module_path(model: torch.nn.Module, module) -> str | None:
    if module is None:
        return None
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def _self_check(gm, cap: Captured, n_ctx: int, d_vocab: int, compare_log_probs: bool, shape=None) -> float:
    """Refuse a graph whose outputs differ from the original model's on a probe
    (of `shape`, default [2, 7]). With center_unembed on, logits move by a
    per-position constant, so log-probs are compared instead."""
    probe = torch.randint(0, d_vocab, shape or (2, min(7, n_ctx)), generator=torch.Generator().manual_seed(1))
    probe = probe.to(cap.device)
    with torch.no_grad():
        want = cap.reference_logits(probe)
        rtol = self_check_rtol(want.dtype)
        want = want.float()
        try:
            got = gm(probe).float().to(want.device)
        except Exception as exc:   # the rewritten graph does not run: a pass broke it
            raise SelfCheckError(
                f"the instrumented graph fails on a probe input of shape {list(probe.shape)} with "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; turn processing "
                f"flags off (or use from_pretrained_no_processing) to find the pass at fault, and "
                f"please report the model") from exc
    if compare_log_probs:
        want, got = want.log_softmax(-1), got.log_softmax(-1)
    err = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), 1.0)
    if not err <= rtol * scale:
        what = "log-probs" if compare_log_probs else "logits"
        raise SelfCheckError(
            f"the instrumented graph's {what} differ from the original model's by {err:.3g} "
            f"(largest {scale:.3g}) on a probe input; fxlens refuses to return wrong numbers. "
            f"Turn processing flags off to find the pass at fault, and please report the model.")
    return err


def _build(source, flags: dict, device, dtype, self_check: bool, default_prepend_bos, on_pass,
           hf_kwargs, stages=None) -> HookedModel:
    unknown = set(hf_kwargs) - _HF_KWARGS
    if unknown:
        raise TypeError(f"unknown keyword(s) {sorted(unknown)}; fxlens takes "
                        f"{sorted(_HF_KWARGS | {'device', 'dtype', 'self_check', 'default_prepend_bos'} | set(PROCESSING_FLAGS))}")
    if any(flags.values()) and dtype in (torch.float16, torch.bfloat16):
        warnings.warn(f"processing weights in {dtype} loses precision; load in float32 and "
                      f"convert afterwards if you need exact folding", stacklevel=3)
    if isinstance(source, Captured):
        cap = source
        if hf_kwargs:
            raise TypeError(f"{sorted(hf_kwargs)} apply when loading; this model is already captured")
    else:
        cap = capture(source, dtype=dtype, kind="decoder", **hf_kwargs)   # the caller chose the kind
    hf = cap.hf_model
    # a graph of its own (parameters copied) unless nobody else can reach the HF
    # model: loaded here from a path, it dies with this call
    internal = not isinstance(source, (Captured, torch.nn.Module))
    probe = None
    if cap.info is not None and not cap.info.covers(2, min(7, cap.n_ctx)):
        probe = (2, cap.info.seq_range[0])   # a per-length graph checks at its own length
    gm, ctx = _instrument(cap, flags, self_check, on_pass, probe, own=not internal)
    for reason in ctx.log.skipped:
        warnings.warn(f"fxlens processing skipped: {reason}", stacklevel=3)
    if cap.placed and device is not None:
        raise TypeError("device= moves the whole model; with device_map the map places it")
    if stages is not None and cap.placed:
        raise TypeError("pipeline_stages places each rank's blocks on its device; leave device_map out")
    stage_device, device = (device, "cpu") if stages is not None else (None, device or cap.device)
    cfg = make_config(ctx.spec, hf.config, cap.n_ctx, cap.name, dtype, device, arch=type(hf).__name__)
    if ctx.log.get("fold_ln") and cfg.normalization_type in ("LN", "RMS"):
        cfg.normalization_type += "Pre"
    if default_prepend_bos is not None:
        cfg.default_prepend_bos = default_prepend_bos
    model_cls = HookedModel if stages is None else PipelinedModel
    model = model_cls(gm, ctx.spec, cfg, tokenizer=cap.tokenizer, processing=ctx.log,
                      pass_results=ctx.results)
    model.hf_config = hf.config
    model.capture_info = cap.info
    model._processing_flags = flags      # process_weights_ updates them; per-length graphs follow
    if cap.info is not None and not cap.placed:
        model._graph_at = lambda batch, seq: _graph_at(cap, flags, self_check, model, batch, seq)
    if stages is not None:
        return model.place_stages(stages[0], stage_device, stages[1])
    return model if cap.placed else model.to(device)


def _instrument(cap: Captured, flags: dict, self_check: bool, on_pass=None, probe_shape=None, own=True):
    """Run the pipeline on a fresh copy of `cap`'s graph (and self-check it)."""
    hf = cap.hf_model
    ctx = Context(embed_path=_module_path(hf, hf.get_input_embeddings()),
                  unembed_path=_module_path(hf, hf.get_output_embeddings()), flags=dict(flags))
    gm = run_pipeline(cap.graph_module(own=own), ctx, on_pass=on_pass)
    if self_check:
        _self_check(gm, cap, cap.n_ctx, ctx.spec.d_vocab, compare_log_probs=bool(flags.get("center_unembed")),
                    shape=probe_shape)
    return gm, ctx


def _graph_at(cap: Captured, flags: dict, self_check: bool, model: HookedModel, batch: int, seq: int):
    """The per-length fallback: `model`'s graph for inputs of `seq` tokens (and
    `batch` rows, where the dynamic export does not cover that batch size
    either), exported and instrumented on first use. It calls `model`'s own
    HookPoints, so hooks and caches see one set of sites whatever the length."""
    from fxlens.passes import materialise_opt_in
    from fxlens.passes.insert_hooks import CONTAINER
    from fxlens.interp.weights import column_maps

    one = cap.at_length(seq)
    if not one.info.covers(batch, seq):
        one = cap.at_length(seq, batch)
    gm, ctx = _instrument(one, flags, self_check, probe_shape=(batch, seq))
    container = gm.get_submodule(CONTAINER)
    for name in model.hook_names:
        if not hasattr(container, name.replace(".", "__")) and is_opt_in_name(name):
            materialise_opt_in(gm, ctx.spec, name, column_maps(gm, ctx.spec))
    own = {m.name for m in container.children()}
    sites = {n for n, hp in model.hook_dict.items() if hp.in_graph}   # not an SAE's own sites
    if own != sites:
        raise CaptureError(
            f"the export for {seq} tokens has other hook sites than the model's "
            f"({sorted(own ^ sites)[:4]}); pass inputs of "
            f"{cap.info.seq_range[0]}..{cap.info.seq_range[1] or ''} tokens")
    for attr, hp in list(container.named_children()):
        setattr(container, attr, model.hook_dict[hp.name])
    return gm, one.info




def encoder_from_pretrained_no_processing(source, *, device=None, dtype=torch.float32,
                                          self_check: bool = True, on_pass=None, compile: bool = False,
                                          **hf_kwargs) -> HookedEncoder:
    """Instrument a BERT-style encoder with TransformerLens's HookedEncoder hook points.

    `source`: a checkpoint folder (loaded as the class its config names, e.g.
    BertForPreTraining or BertModel), a cached hub id, a `PreTrainedModel`, or an
    `EncoderCaptured` from `fxlens.capture_encoder`. Weights are not processed
    (neither are TransformerLens's HookedEncoder's). See `fxlens.runtime.encoder`.
    """
    model = build_encoder(source, device=device, dtype=dtype, self_check=self_check, on_pass=on_pass,
                          hf_kwargs=hf_kwargs)
    return model.compile() if compile else model


def _is_encoder(source, kind: str, hf_kwargs: dict) -> bool:
    if kind not in ("auto", "decoder", "encoder"):
        raise ValueError(f"kind={kind!r}; use 'auto' (what the checkpoint declares), 'decoder' "
                         f"(causal LMs) or 'encoder' (BERT-style)")
    if kind == "auto":
        return checkpoint_kind(source, hf_kwargs) == "encoder"
    return kind == "encoder" or isinstance(source, EncoderCaptured)


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
    if _is_encoder(source, kind, hf_kwargs):
        if pipeline_stages is not None:
            raise NotApplicableError("pipeline_stages applies to causal LMs; this checkpoint is an encoder")
        return encoder_from_pretrained_no_processing(source, device=device, dtype=dtype, self_check=self_check,
                                                     on_pass=on_pass, compile=compile, **hf_kwargs)
    flags = {f: False for f in PROCESSING_FLAGS}
    model = _build(source, flags, device, dtype, self_check, default_prepend_bos, on_pass, hf_kwargs,
                   _stages(pipeline_stages, pipeline_microbatches, compile))
    return model.compile() if compile else model


def _stages(n, microbatches, compile: bool):
    """(stages, microbatches) for _build, or None without pipeline_stages."""
    if n is None:
        if microbatches is not None:
            raise TypeError("pipeline_microbatches applies with pipeline_stages=K")
        return None
    if compile:
        raise NotApplicableError("compile=True with pipeline_stages: stages run their eager graphs; "
                                 "drop one of the two")
    join_world(int(n))          # before the (long) capture: a missing torchrun fails at once
    return int(n), microbatches


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
    if _is_encoder(source, kind, hf_kwargs):
        if pipeline_stages is not None:
            raise NotApplicableError("pipeline_stages applies to causal LMs; this checkpoint is an encoder")
        warn_processing_skipped(flags)
        return encoder_from_pretrained_no_processing(source, device=device, dtype=dtype, self_check=self_check,
                                                     on_pass=on_pass, compile=compile, **hf_kwargs)
    model = _build(source, flags, device, dtype, self_check, default_prepend_bos, on_pass, hf_kwargs,
                   _stages(pipeline_stages, pipeline_microbatches, compile))
    return model.compile() if compile else model
