"""fxlens: TransformerLens hooks on any HuggingFace checkpoint, by graph rewriting.

This file only re-exports the public API; the layers, lowest first:
`errors`, `ir/` (graph helpers, parameters, traces, hook points), `frontend/`
(load and export the HF model), `discovery/` (TransformerLens sites from
provenance and dataflow), `passes` (the compiler passes, top-level `passes/`),
`pipeline` (the pass pipelines), `interp/` (activation cache, weight views,
TransformerLens surface), `runtime/` (the hooked models, compiled variants,
KV cache, generation), `api` (`from_pretrained*`) and `tools/` (dump, cli,
harvest).
"""

from fxlens.api import (LOW_PRECISION_EPS, PROCESSING_FLAGS, SELF_CHECK_RTOL, encoder_from_pretrained_no_processing,
                        from_pretrained, from_pretrained_no_processing, self_check_rtol)
from fxlens.errors import (CaptureError, ContextLengthError, FxlensError, HarvestError, HookReturnError, InputError,
                           NotApplicableError, PaddingError, PassError, PipelineError, ProcessingError, SAEError, SelfCheckError,
                           UnknownHookError, UnmappableModelError)
from fxlens.frontend.decoder import Captured, capture
from fxlens.interp.cache import ActivationCache
from fxlens.discovery.names import act_name
from fxlens.runtime.encoder import EncoderCaptured, HookedEncoder, capture_encoder
from fxlens.runtime.model import HookedModel
from fxlens.runtime.stages import PipelinedModel
from fxlens.tools.harvesting import harvest

__all__ = ["capture", "Captured", "from_pretrained", "from_pretrained_no_processing", "HookedModel", "ActivationCache",
           "encoder_from_pretrained_no_processing", "capture_encoder", "EncoderCaptured", "HookedEncoder",
           "act_name", "FxlensError", "CaptureError", "UnmappableModelError", "UnknownHookError",
           "HookReturnError", "ContextLengthError", "HarvestError", "harvest", "SelfCheckError", "ProcessingError", "PassError",
           "InputError", "NotApplicableError", "PaddingError", "SAEError", "self_check_rtol", "PipelineError",
           "PipelinedModel"]
