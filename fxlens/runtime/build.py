"""Building a hooked model: capture, run the pipeline, self-check on a probe, wrap.

The model classes come in as arguments (`classes`: the decoder's and the
encoder's), so this module sits below them: `HookedModel.from_pretrained`
(TransformerLens's name, fxlens/runtime/model.py) and `fxlens.from_pretrained`
(fxlens/api.py) both call `load`.
"""

from __future__ import annotations

import warnings

import torch

from fxlens.discovery.columns import column_maps
from fxlens.discovery.config import make_config
from fxlens.discovery.names import is_opt_in
from fxlens.errors import CaptureError, SelfCheckError
from fxlens.frontend.capture import capture
from fxlens.frontend.decoder import Captured, checkpoint_kind
from fxlens.frontend.encoder import EncoderCaptured, capture_encoder
from fxlens.ir.graph import site_node
from fxlens.ir.params import get_tensor
from fxlens.ir.probe import SELF_CHECK_RTOL, check_on_probe, probe_tokens, self_check_rtol
from fxlens.passes import materialise_opt_in
from fxlens.passes.insert_hooks import CONTAINER
from fxlens.pipeline import ENCODER, Context, run_pipeline

PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                    "refactor_factored_attn_matrices")
# from_pretrained's defaults (TransformerLens's): every flag but the refactoring on
DEFAULT_FLAGS = {f: f != "refactor_factored_attn_matrices" for f in PROCESSING_FLAGS}
HF_KWARGS = {"gguf_file", "revision", "trust_remote_code", "cache_dir", "local_files_only",
              "subfolder", "token", "tokenizer", "device_map", "max_memory", "offload_folder"}

def submodule_path(model: torch.nn.Module, module) -> str | None:
    """The name of `module` inside `model` (None if it is not one of its modules)."""
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
    probe = probe_tokens(d_vocab, n_ctx, shape, cap.device)
    with torch.no_grad():
        want = cap.reference_logits(probe)
        try:
            got = gm(probe)
        except Exception as exc:   # the rewritten graph does not run: a pass broke it
            raise SelfCheckError(
                f"the instrumented graph fails on a probe input of shape {list(probe.shape)} with "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; turn processing "
                f"flags off (or use from_pretrained_no_processing) to find the pass at fault, and "
                f"please report the model") from exc
    what = "log-probs" if compare_log_probs else "logits"
    return check_on_probe(
        want, got, self_check_rtol(want.dtype), log_probs=compare_log_probs,
        failure=lambda err, scale: f"the instrumented graph's {what} differ from the original model's by {err:.3g} "
        f"(largest {scale:.3g}) on a probe input; fxlens refuses to return wrong numbers. "
        f"Turn processing flags off to find the pass at fault, and please report the model.")


def build_decoder(model_cls, source, flags: dict, device, dtype, self_check: bool, default_prepend_bos, on_pass,
                  hf_kwargs, stages=None):
    """A `model_cls` (HookedModel) for a causal LM: `source` captured (or a Captured), instrumented.
    With `stages` (K, microbatches), `model_cls` is PipelinedModel and the model comes
    back placed as this rank's stage (fxlens/runtime/stages.py)."""
    unknown = set(hf_kwargs) - HF_KWARGS
    if unknown:
        raise TypeError(f"unknown keyword(s) {sorted(unknown)}; fxlens takes "
                        f"{sorted(HF_KWARGS | {'device', 'dtype', 'self_check', 'default_prepend_bos'} | set(PROCESSING_FLAGS))}")
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
    ctx = Context(embed_path=submodule_path(hf, hf.get_input_embeddings()),
                  unembed_path=submodule_path(hf, hf.get_output_embeddings()), flags=dict(flags))
    gm = run_pipeline(cap.graph_module(own=own), ctx, on_pass=on_pass)
    if self_check:
        _self_check(gm, cap, cap.n_ctx, ctx.spec.d_vocab, compare_log_probs=bool(flags.get("center_unembed")),
                    shape=probe_shape)
    return gm, ctx


def _graph_at(cap: Captured, flags: dict, self_check: bool, model, batch: int, seq: int):
    """The per-length fallback: `model`'s graph for inputs of `seq` tokens (and
    `batch` rows, where the dynamic export does not cover that batch size
    either), exported and instrumented on first use. It calls `model`'s own
    HookPoints, so hooks and caches see one set of sites whatever the length."""
    one = cap.at_length(seq)
    if not one.info.covers(batch, seq):
        one = cap.at_length(seq, batch)
    gm, ctx = _instrument(one, flags, self_check, probe_shape=(batch, seq))
    container = gm.get_submodule(CONTAINER)
    for name in model.hook_names:
        if not hasattr(container, name.replace(".", "__")) and is_opt_in(name):
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


def _encoder_self_check(gm, hf_model, n_ctx: int, d_vocab: int, rtol: float) -> float:
    """The graph's output vs the HF model's first output (MLM logits, or the last
    hidden state of a bare encoder) on a probe input."""
    probe = probe_tokens(d_vocab, n_ctx, device=next(hf_model.parameters()).device)
    with torch.no_grad():
        want, got = hf_model(probe)[0], gm(probe)
    return check_on_probe(
        want, got, rtol,
        failure=lambda err, scale: f"the instrumented encoder's outputs differ from the original model's by {err:.3g} "
        f"(largest {scale:.3g}) on a probe input; fxlens refuses to return wrong numbers. "
        f"Please report the model.")


def build_encoder(encoder_cls, source, *, device=None, dtype=torch.float32, self_check: bool = True, on_pass=None,
                  hf_kwargs: dict):
    """An `encoder_cls` (HookedEncoder) for a BERT-style encoder, weights unprocessed."""
    unknown = set(hf_kwargs) - HF_KWARGS
    if unknown:
        raise TypeError(f"unknown keyword(s) {sorted(unknown)}; fxlens takes "
                        f"{sorted(HF_KWARGS | {'device', 'dtype', 'self_check', 'on_pass', 'compile'})}")
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
    ctx = Context(embed_path=submodule_path(hf, hf.get_input_embeddings()),
                  unembed_path=submodule_path(hf, hf.get_output_embeddings()),
                  flags={f: False for f in PROCESSING_FLAGS})
    # a graph of its own unless nobody else can reach the HF model (loaded here from a path)
    gm = run_pipeline(cap.graph_module(own=cap is not internal), ctx, pipeline=ENCODER,
                      on_pass=on_pass)
    if self_check:
        d_vocab = get_tensor(gm, site_node(gm, ctx.spec.embed).args[0].target).shape[0]
        _encoder_self_check(gm, hf, cap.n_ctx, d_vocab, SELF_CHECK_RTOL)
    device = device or next(hf.parameters()).device
    cfg = make_config(ctx.spec, hf.config, cap.n_ctx, cap.name, dtype, device, arch=type(hf).__name__)
    cfg.attention_dir = "bidirectional"
    cfg.default_prepend_bos = False           # the tokenizer adds [CLS] ... [SEP] itself
    if ctx.spec.unembed is None:
        cfg.d_vocab_out = None                # no MLM head: the output is the residual stream
    model = encoder_cls(gm, ctx.spec, cfg, tokenizer=cap.tokenizer, processing=ctx.log,
                          pass_results=ctx.results)
    model.hf_config = hf.config
    return model.to(device)


def warn_processing_skipped(flags: dict) -> None:
    on = sorted(f for f, v in flags.items() if v)
    if on:
        warnings.warn(f"fxlens processing skipped: {', '.join(on)} (encoders load unprocessed, as "
                      f"TransformerLens's HookedEncoder does); use encoder_from_pretrained_no_processing",
                      stacklevel=3)


def is_encoder(source, kind: str, hf_kwargs: dict) -> bool:
    """Whether `source` is instrumented as an encoder: `kind` "encoder", or "auto" and the checkpoint is one."""
    if kind not in ("auto", "decoder", "encoder"):
        raise ValueError(f"kind={kind!r}; use 'auto' (what the checkpoint declares), 'decoder' "
                         f"(causal LMs) or 'encoder' (BERT-style)")
    if kind == "auto":
        return checkpoint_kind(source, hf_kwargs) == "encoder"
    return kind == "encoder" or isinstance(source, EncoderCaptured)


def load(classes: tuple, source, flags: dict, *, device=None, dtype=torch.float32, self_check: bool = True,
         default_prepend_bos: bool | None = None, on_pass=None, compile: bool = False, kind: str = "auto",
         stages=None, **hf_kwargs):
    """`fxlens.from_pretrained*`: a decoder (classes[0]) with the processing `flags`, or an
    encoder (classes[1], unprocessed: a warning names the flags skipped). `stages`: see
    `build_decoder` (fxlens.api checks them)."""
    model_cls, encoder_cls = classes
    flags = {f: flags.get(f, False) for f in PROCESSING_FLAGS}
    if is_encoder(source, kind, hf_kwargs):
        warn_processing_skipped(flags)
        model = build_encoder(encoder_cls, source, device=device, dtype=dtype, self_check=self_check,
                              on_pass=on_pass, hf_kwargs=hf_kwargs)
    else:
        model = build_decoder(model_cls, source, flags, device, dtype, self_check, default_prepend_bos, on_pass,
                              hf_kwargs, stages)
    return model.compile() if compile else model
