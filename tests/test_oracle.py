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


@pytest.mark.parametrize("site", ["attn.hook_result", "hook_mlp_in", "hook_q_input", "hook_k_input",
                                  "hook_v_input"])
def test_opt_in_sites_match_transformerlens(arch, site):
    """Opt-in sites exist once a user names them, with no flag set first."""
    import fxlens
    from conftest import captured

    model = fxlens.from_pretrained_no_processing(captured(arch))  # its own: the rewrite changes the graph
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


def test_per_head_inputs_edit_one_head_only(arch):
    """hook_q_input holds one copy of resid_pre per head; editing head 1's copy moves
    head 1's q and nothing else (k reads its own input)."""
    import fxlens
    from conftest import captured

    model = fxlens.from_pretrained_no_processing(captured(arch))
    tokens = oracle(arch, "tokens")["tokens"]
    _, base = model.run_with_cache(tokens, names_filter=["blocks.1.attn.hook_q", "blocks.1.attn.hook_k"])
    seen = {}

    def shift(x, hook):
        x = x.clone()
        x[:, :, 1] += torch.linspace(-1, 1, x.shape[-1])   # a direction LayerNorm does not remove
        return x

    def save(x, hook):
        seen[hook.name] = x

    model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_q_input", shift),
                                            ("blocks.1.attn.hook_q", save), ("blocks.1.attn.hook_k", save)])
    change = (seen["blocks.1.attn.hook_q"] - base["blocks.1.attn.hook_q"]).abs().amax(dim=(0, 1, 3))
    assert change[1] > 1e-2 and torch.all(change[[0, 2, 3]] == 0)
    assert torch.equal(seen["blocks.1.attn.hook_k"], base["blocks.1.attn.hook_k"])


def test_hook_attn_in_is_one_input_for_q_k_v():
    import fxlens
    from conftest import captured

    model = fxlens.from_pretrained_no_processing(captured("gpt2"))
    tokens = oracle("gpt2", "tokens")["tokens"]
    logits, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_attn_in", "blocks.0.hook_resid_pre"])
    attn_in = cache["blocks.0.hook_attn_in"]
    assert attn_in.shape == (2, 8, model.cfg.n_heads, model.cfg.d_model)
    assert torch.equal(attn_in, cache["blocks.0.hook_resid_pre"][:, :, None].expand_as(attn_in))
    assert rel_err(logits, oracle("gpt2", "raw_logits")["logits"]) <= RTOL
    # ln1 now normalises each head's copy, and its hooks show the head axis (TransformerLens too)
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.ln1.hook_scale", "blocks.1.ln1.hook_scale"])
    assert cache["blocks.0.ln1.hook_scale"].shape == (2, 8, model.cfg.n_heads, 1)
    assert cache["blocks.1.ln1.hook_scale"].shape == (2, 8, 1)
    with pytest.raises(fxlens.FxlensError, match="exclude each other"):
        model.run_with_cache(tokens, names_filter=["blocks.0.hook_q_input"])
    gqa = fxlens.from_pretrained_no_processing(captured("llama"))
    with pytest.raises(fxlens.FxlensError, match="kv heads"):
        gqa.run_with_cache(tokens, names_filter=["blocks.0.hook_attn_in"])
