"""forward(stop_at_layer=...) / forward(start_at_layer=...), as in TransformerLens."""

import pytest
import torch

from conftest import oracle, oracle_model

# the same float32 graph runs either way: only rounding can differ
ATOL = 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_stop_then_start_reproduces_the_full_forward(arch):
    model = oracle_model(arch)
    tokens = oracle(arch, "tokens")["tokens"]
    logits, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers + 1):
        resid = model(tokens, stop_at_layer=layer)
        want = cache[f"blocks.{layer}.hook_resid_pre"] if layer < model.cfg.n_layers \
            else cache[f"blocks.{layer - 1}.hook_resid_post"]
        assert torch.allclose(resid, want, atol=ATOL)
        rest = model(resid, start_at_layer=layer, tokens=tokens)
        assert torch.allclose(rest, logits, atol=ATOL)
    # start and stop together give one block's output
    mid = model(cache["blocks.1.hook_resid_pre"], start_at_layer=1, stop_at_layer=2)
    assert torch.allclose(mid, cache["blocks.1.hook_resid_post"], atol=ATOL)
    loss = model(cache["resid_pre", 2], start_at_layer=2, tokens=tokens, return_type="loss")
    assert abs(loss.item() - model(tokens, return_type="loss").item()) <= 1e-5


def test_hooks_before_the_start_do_not_fire():
    model = oracle_model("gpt2")
    tokens = oracle("gpt2", "tokens")["tokens"]
    _, cache = model.run_with_cache(tokens)
    seen = []
    with model.hooks(fwd_hooks=[(lambda name: True, lambda x, hook: seen.append(hook.name))]):
        model(cache["resid_pre", 2], start_at_layer=2)
    assert seen[0] == "blocks.2.hook_resid_pre" and all(
        not n.startswith(("blocks.0", "blocks.1", "hook_")) for n in seen)
    with pytest.raises(ValueError, match="3 layers"):
        model(tokens, stop_at_layer=7)
