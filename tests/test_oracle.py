"""fxlens against TransformerLens's own activations on the same weights (raw mode)."""

import pytest
import torch

from conftest import RTOL, oracle, oracle_hooks, oracle_model, rel_err


def test_logits_match_transformerlens(arch):
    model = oracle_model(arch)
    tokens = oracle(arch, "tokens")["tokens"]
    want = oracle(arch, "raw_logits")["logits"]
    assert rel_err(model(tokens), want) <= RTOL


def test_hook_names_are_transformerlens_names_in_order(arch):
    """The golden list: the ordered hook names equal TransformerLens's, and so do
    the cache's keys."""
    model = oracle_model(arch)
    want = list(oracle_hooks(arch)["hooks"])
    assert model.hook_names == want
    _, cache = model.run_with_cache(oracle(arch, "tokens")["tokens"])
    assert list(cache.keys()) == want


def test_every_activation_matches_transformerlens(arch):
    model = oracle_model(arch)
    ref = oracle(arch, "raw")
    shapes = oracle_hooks(arch)["hooks"]
    _, cache = model.run_with_cache(oracle(arch, "tokens")["tokens"])
    bad = {}
    for name, want in ref.items():
        got = cache[name]
        assert list(got.shape) == shapes[name], name
        err = rel_err(got, want)
        if not err <= RTOL:
            bad[name] = err
    assert not bad, bad


def test_attention_scores_are_masked_like_transformerlens(arch):
    model = oracle_model(arch)
    ref = oracle(arch, "raw")
    _, cache = model.run_with_cache(oracle(arch, "tokens")["tokens"],
                                    names_filter=lambda n: n.endswith("hook_attn_scores"))
    assert len(cache) == model.cfg.n_layers
    for name, got in cache.items():
        want = ref[name]
        assert torch.equal(torch.isinf(got), torch.isinf(want)), name
        assert (got[torch.isinf(got)] < 0).all()
        # causal: every key after the query is masked
        pos = got.shape[-1]
        future = torch.triu(torch.ones(pos, pos, dtype=torch.bool), 1)
        assert torch.isinf(got[..., future]).all()


@pytest.mark.parametrize("site", ["attn.hook_result", "hook_mlp_in"])
def test_opt_in_sites_match_transformerlens(arch, site):
    """Opt-in sites exist once a user names them, with no flag set first."""
    model = oracle_model(arch)
    tokens = oracle(arch, "tokens")["tokens"]
    ref = oracle(arch, "raw_extra")
    names = [f"blocks.{layer}.{site}" for layer in range(model.cfg.n_layers)]
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    for name in names:
        assert rel_err(cache[name], ref[name]) <= RTOL, name
    # the rewrite keeps the model's numbers
    assert rel_err(logits, oracle(arch, "raw_logits")["logits"]) <= RTOL
    # and the default sites stay as they were
    assert all(name in model.hook_names for name in names)
