"""The one probe self-check: a fixed input of random tokens, and a comparison of
two outputs on it that refuses (`SelfCheckError`) a difference beyond tolerance.

Used by the load-time check of a built decoder and encoder (fxlens/runtime/build.py)
and by weight processing on a loaded model (`process_weights_`, fxlens/interp/tl_surface.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fxlens.errors import SelfCheckError

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

PROBE_LEN = 7      # tokens per row, or n_ctx if shorter
PROBE_SEED = 1     # the same probe on every call: a failure reproduces


def self_check_rtol(dtype: torch.dtype) -> float:
    """The relative tolerance of the self-check for a model computing in `dtype`."""
    return max(SELF_CHECK_RTOL, LOW_PRECISION_EPS * torch.finfo(dtype).eps)


def probe_tokens(d_vocab: int, n_ctx: int, shape=None, device=None, batch: int = 2) -> torch.Tensor:
    """The probe: tokens of `shape` (default [batch, min(7, n_ctx)]) drawn from a fixed seed."""
    shape = tuple(shape or (batch, min(PROBE_LEN, n_ctx)))
    probe = torch.randint(0, d_vocab, shape, generator=torch.Generator().manual_seed(PROBE_SEED))
    return probe if device is None else probe.to(device)


def check_on_probe(want: torch.Tensor, got: torch.Tensor, rtol: float,
                   failure: Callable[[float, float], str], log_probs: bool = False) -> float:
    """The largest difference of `got` from `want` (both in float32, on `want`'s
    device; as log-probs over the last dim with `log_probs`). Raises
    SelfCheckError(failure(err, scale)) unless err <= rtol * scale, scale being
    the largest |want| (at least 1)."""
    want = want.float()
    got = got.float().to(want.device)
    if log_probs:
        want, got = want.log_softmax(-1), got.log_softmax(-1)
    err = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), 1.0)
    if not err <= rtol * scale:     # also refuses a NaN
        raise SelfCheckError(failure(err, scale))
    return err
