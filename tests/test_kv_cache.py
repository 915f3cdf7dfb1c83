"""The KV-cache decode graph: one token at a time equals the full graph, or it is refused."""

import functools
import warnings

import pytest
import torch

import fxlens
from fxlens.runtime.generate import KVCacheWarning
from fxlens.runtime.kv_cache import build_decoder, config_windows, probe_length
from tiny_models import tiny_config, tiny_model

ARCHS = ["mistral", "qwen3", "gemma2", "gemma2_sw", "phi", "falcon", "gpt_bigcode", "olmo2", "mixtral"]
WINDOW = 8          # local layers' window; prompts of 4 plus 12 new tokens go well past it
# name -> (tiny architecture, config overrides)
WINDOWED = {
    "mistral_w8": ("mistral", dict(sliding_window=WINDOW)),                      # every layer local
    "gemma2_w8": ("gemma2", dict(sliding_window=WINDOW)),                        # local, global; soft-caps
    "gemma3_w8": ("gemma3", dict(sliding_window=WINDOW)),                        # local, global; 2 rotary bases
    "falcon_alibi": ("falcon", dict(alibi=True)),      # ALiBi: a bias over key positions, no window
}


@functools.lru_cache(maxsize=None)
def model_of(arch):
    return fxlens.from_pretrained_no_processing(tiny_model(arch))


@functools.lru_cache(maxsize=None)
def windowed(name):
    arch, overrides = WINDOWED[name]
    hf = tiny_model(arch, **overrides)
    return hf, fxlens.from_pretrained_no_processing(hf)


def greedy(model, ids, n, **kw):
    return model.generate(ids, max_new_tokens=n, do_sample=False, stop_at_eos=False, verbose=False, **kw)


@torch.no_grad()
def hf_greedy(hf, ids, n):
    """HF's greedy tokens: the argmax of HF's own forward on the whole sequence, n times (what
    `hf.generate(do_sample=False)` returns, without its start-up cost)."""
    for _ in range(n):
        ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


PROMPT = torch.randint(3, 250, (2, 4), generator=torch.Generator().manual_seed(5))


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


@pytest.mark.parametrize("name", list(WINDOWED))
def test_cached_generation_with_position_dependent_scores_equals_hf(name):
    # the mask of a local layer hides keys more than WINDOW back (ALiBi: a bias grows with the
    # distance); the decode graph computes it for the cached positions as the full graph does
    # (and a reshape of the scores to [.., pos, pos] takes the cache's key length); greedy ids
    # are compared exactly (float32 ties between the top two logits are far rarer than the
    # margins of these random models)
    hf, model = windowed(name)
    want = hf_greedy(hf, PROMPT, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KVCacheWarning)      # the cache is used, not refused
        assert torch.equal(greedy(model, PROMPT, 12), want)
    assert model._decoder_cache[1] is not None
    if "sliding_window" in WINDOWED[name][1]:       # the load check ran past the window
        assert probe_length(model, model._decoder_cache[1]) > WINDOW + 1


def test_load_check_probes_past_every_window():
    # windows are read from the masks' computation (gemma2_sw's 4 is shorter than the old
    # 6-token probe) and from the config's fields; the probe runs past the longest
    for model, window in ((model_of("gemma2_sw"), 4), (windowed("gemma3_w8")[1], WINDOW)):
        decoder, why = build_decoder(model)
        assert decoder is not None and why == "" and window in decoder.windows
        assert probe_length(model, decoder) > window + 1
    assert config_windows(tiny_config("mistral", sliding_window=40, attention_chunk_size=16)) >= {40, 16}


def test_score_term_from_key_activations_falls_back_with_a_warning(monkeypatch):
    # a score bias computed from the keys (all cached positions): the decode graph would only have
    # the new key's, so the rewrite is refused by name and generate recomputes, equal to HF
    import transformers.models.mistral.modeling_mistral as mistral

    plain = mistral.eager_attention_forward

    def key_biased(module, query, key, value, attention_mask, *args, **kwargs):
        bias = key.mean(dim=(1, 3))[:, None, None, :]             # [batch, 1, 1, key]
        return plain(module, query, key, value, attention_mask + bias, *args, **kwargs)

    monkeypatch.setattr(mistral, "eager_attention_forward", key_biased)
    hf = tiny_model("mistral", sliding_window=WINDOW)
    model = fxlens.from_pretrained_no_processing(hf)
    want = hf_greedy(hf, PROMPT, 12)
    with pytest.warns(KVCacheWarning, match="depends on activations at every key position"):
        got = greedy(model, PROMPT, 12)
    assert torch.equal(got, want)
