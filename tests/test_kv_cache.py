"""The KV-cache decode graph: one token at a time equals the full graph, or it is refused."""

import functools
import warnings

import pytest
import torch

import fxlens
from fxlens.kv_cache import build_decoder
from tiny_models import tiny_model

ARCHS = ["mistral", "qwen3", "gemma2", "gemma2_sw", "phi", "falcon", "gpt_bigcode", "olmo2", "mixtral"]


@functools.lru_cache(maxsize=None)
def model_of(arch):
    return fxlens.from_pretrained_no_processing(tiny_model(arch))


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_equals_recomputing(arch):
    model = model_of(arch)
    ids = torch.randint(3, 250, (2, 5), generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a refused decode graph says so; the result must agree anyway
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False,
                           use_past_kv_cache=False)
    assert torch.equal(cached, plain)


def test_sliding_window_shorter_than_the_probe_is_refused_with_the_reason():
    # gemma2_sw's window (4) is shorter than the load check's probe: dropping the mask would be wrong
    decoder, why = build_decoder(model_of("gemma2_sw"))
    assert decoder is None and "differ" in why
    decoder, why = build_decoder(model_of("mistral"))
    assert decoder is not None and why == ""
