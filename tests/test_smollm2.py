"""The real checkpoint: SmolLM2-135M-Instruct (Llama architecture, GQA, 30 layers)."""

import pytest
import torch

from conftest import smollm2_pair


@pytest.fixture(scope="module")
def smol():
    return smollm2_pair()


def test_logits_equal_hf_and_paris_comes_next(smol):
    model, hf = smol
    tokens = model.to_tokens("The capital of France is")
    with torch.no_grad():
        want = hf(tokens, use_cache=False).logits
    got = model(tokens)
    # float32, 30 layers: the exposed norms round differently (x/sqrt vs x*rsqrt),
    # ~1e-6 of the logits' size; 1e-4 relative separates that from a real error
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert model.to_string(got[0, -1].argmax()) == " Paris"


def test_sites_of_a_real_gqa_model(smol):
    model, _ = smol
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (30, 576, 9, 3, 64)
    per_block = 20  # resid_pre, ln1 x2, q k v rot_q rot_k scores pattern z, attn_out, resid_mid, ln2 x2, pre pre_linear post, mlp_out, resid_post
    assert len(model.hook_names) == 1 + 30 * per_block + 4
    _, cache = model.run_with_cache("Hello there", names_filter=lambda n: ".29." in n)
    assert cache["blocks.29.attn.hook_k"].shape == (1, 3, 3, 64)
    assert cache["blocks.29.attn.hook_q"].shape == (1, 3, 9, 64)
    assert cache["blocks.29.mlp.hook_pre_linear"].shape == (1, 3, 1536)
