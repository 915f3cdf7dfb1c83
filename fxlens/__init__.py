"""fxlens: TransformerLens hooks on any HuggingFace checkpoint, by graph rewriting.

This file only re-exports the public API. The layers, lowest first (each
imports only from itself and those before it; tests/test_structure.py checks):
`errors`, `ir/` (graph helpers, parameters, traces, hook points), `discovery/`
(TransformerLens sites from provenance and dataflow, column maps, cfg),
`passes` (the compiler passes, top-level `passes/`), `frontend/` (load and
export the HF model), `pipeline` (the pass pipelines), `interp/` (activation
cache, weight views, TransformerLens surface), `runtime/` (building, the hooked
models, compiled variants, KV cache, generation), `api` (`from_pretrained*`)
and `tools/` (dump, cli, harvest).
"""

from fxlens.api import encoder_from_pretrained_no_processing, from_pretrained, from_pretrained_no_processing
from fxlens.errors import (CaptureError, ContextLengthError, FxlensError, HarvestError, HookReturnError, InputError,
                           NotApplicableError, PaddingError, PassError, PipelineError, ProcessingError, SAEError,
                           SelfCheckError,
                           UnknownHookError, UnmappableModelError)
from fxlens.frontend.capture import capture
from fxlens.frontend.decoder import Captured
from fxlens.interp.cache import ActivationCache
from fxlens.discovery.names import act_name
from fxlens.frontend.encoder import EncoderCaptured, capture_encoder
from fxlens.ir.probe import LOW_PRECISION_EPS, SELF_CHECK_RTOL, self_check_rtol
from fxlens.runtime.build import PROCESSING_FLAGS
from fxlens.runtime.model import HookedEncoder, HookedModel
from fxlens.runtime.stages import PipelinedModel
from fxlens.tools.harvesting import harvest

__all__ = ["capture", "Captured", "from_pretrained", "from_pretrained_no_processing", "HookedModel", "ActivationCache",
           "encoder_from_pretrained_no_processing", "capture_encoder", "EncoderCaptured", "HookedEncoder",
           "act_name", "FxlensError", "CaptureError", "UnmappableModelError", "UnknownHookError",
           "HookReturnError", "ContextLengthError", "HarvestError", "harvest", "SelfCheckError", "ProcessingError", "PassError",
           "InputError", "NotApplicableError", "PaddingError", "SAEError", "self_check_rtol", "PipelineError",
           "PipelinedModel"]
