"""Hooks that edit: the returned tensor replaces the activation downstream."""

import pytest
import torch

import fxlens
from conftest import oracle, oracle_model, hf_model

# Comparing one computation done two ways in float32 (graph vs hand-written
# with the same weights): differences are rounding, ~1e-6 of the values.
ATOL = 1e-4


@pytest.fixture(scope="module")
def gpt2():
    return oracle_model("gpt2")


@pytest.fixture(scope="module")
def tokens():
    return oracle("gpt2", "tokens")["tokens"]


def test_zero_ablating_a_head_changes_logits_as_computed_by_hand(gpt2, tokens):
    hf = hf_model("gpt2")
    layer, head = gpt2.cfg.n_layers - 1, 2
    d_head = gpt2.cfg.d_head
    _, cache = gpt2.run_with_cache(tokens)

    def ablate(z, hook):
        z = z.clone()
        z[:, :, head] = 0.0
        return z

    got = gpt2.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
    # by hand: the head wrote z_h @ W_O[h] into the residual stream at resid_mid;
    # remove it, rerun the block's MLP, then the final LayerNorm and unembedding
    # with the HF model's own modules
    block = hf.transformer.h[layer]
    w_o = block.attn.c_proj.weight  # Conv1D: [n_heads*d_head, d_model]
    w_o_h = w_o[head * d_head:(head + 1) * d_head]
    z_h = cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
    with torch.no_grad():
        resid_mid = cache[f"blocks.{layer}.hook_resid_mid"] - z_h @ w_o_h
        resid_post = resid_mid + block.mlp(block.ln_2(resid_mid))
        want = hf.lm_head(hf.transformer.ln_f(resid_post))
    assert (got - want).abs().max() <= ATOL
    assert (got - gpt2(tokens)).abs().max() > 1e-2  # the ablation did something


def test_patching_resid_post_reproduces_the_other_run(gpt2, tokens):
    other = torch.flip(tokens, dims=[1])
    other_logits, other_cache = gpt2.run_with_cache(other)
    for layer in range(gpt2.cfg.n_layers):
        name = f"blocks.{layer}.hook_resid_post"
        patched = gpt2.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: other_cache[hook.name])])
        assert (patched - other_logits).abs().max() <= ATOL


def test_hooks_live_only_for_the_call_or_block(gpt2, tokens):
    base = gpt2(tokens)
    name = "blocks.0.hook_resid_pre"
    zero = lambda x, hook: torch.zeros_like(x)  # noqa: E731
    gpt2.run_with_hooks(tokens, fwd_hooks=[(name, zero)])
    assert torch.equal(gpt2(tokens), base)
    with gpt2.hooks(fwd_hooks=[(name, zero)]):
        assert not torch.allclose(gpt2(tokens), base)
    assert torch.equal(gpt2(tokens), base)
    with pytest.raises(RuntimeError):
        with gpt2.hooks(fwd_hooks=[(name, zero)]):
            raise RuntimeError("boom")
    assert torch.equal(gpt2(tokens), base)


def test_add_hook_and_reset_hooks(gpt2, tokens):
    seen = []
    gpt2.add_hook("blocks.1.hook_mlp_out", lambda x, hook: seen.append(hook.name))
    gpt2.add_hook("blocks.1.hook_attn_out", lambda x, hook: seen.append(hook.name), is_permanent=True)
    gpt2(tokens)
    assert seen == ["blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"]
    gpt2.reset_hooks()
    seen.clear()
    gpt2(tokens)
    assert seen == ["blocks.1.hook_attn_out"]
    gpt2.reset_hooks(including_permanent=True)
    seen.clear()
    gpt2(tokens)
    assert seen == []


def test_predicate_hooks_see_every_matching_site(gpt2, tokens):
    seen = []
    gpt2.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"),
                                            lambda x, hook: seen.append((hook.name, hook.layer())))])
    assert seen == [(f"blocks.{i}.attn.hook_pattern", i) for i in range(gpt2.cfg.n_layers)]


def test_run_with_cache_filters_and_indexing(gpt2, tokens):
    _, full = gpt2.run_with_cache(tokens)
    assert list(full.keys()) == gpt2.hook_names
    _, one = gpt2.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    assert list(one.keys()) == ["blocks.1.attn.hook_pattern"]
    _, some = gpt2.run_with_cache(tokens, names_filter=["blocks.2.hook_resid_post", "hook_embed"])
    assert list(some.keys()) == ["hook_embed", "blocks.2.hook_resid_post"]
    assert torch.equal(full["resid_post", 2], full["blocks.2.hook_resid_post"])
    assert torch.equal(full["pattern", 0], full["blocks.0.attn.hook_pattern"])
    assert torch.equal(full["scale", 1, "ln2"], full["blocks.1.ln2.hook_scale"])
    assert torch.equal(full["scale"], full["ln_final.hook_scale"])
    assert "resid_mid" not in full and ("resid_mid", 0) in full
    _, single = gpt2.run_with_cache(tokens[:1], remove_batch_dim=True)
    assert single["resid_pre", 0].shape == full["resid_pre", 0].shape[1:]
    assert torch.allclose(single["resid_pre", 0], full["resid_pre", 0][0], atol=ATOL)


def test_return_types_and_loss(gpt2, tokens):
    logits = gpt2(tokens)
    assert gpt2(tokens, return_type=None) is None
    loss = gpt2(tokens, return_type="loss")
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1))
    assert abs(loss.item() - want.item()) <= 1e-5
    both_logits, both_loss = gpt2(tokens, return_type="both")
    assert torch.equal(both_logits, logits) and torch.equal(both_loss, loss)
    per_token = gpt2(tokens, return_type="loss", loss_per_token=True)
    assert per_token.shape == (tokens.shape[0], tokens.shape[1] - 1)


def test_batch_and_sequence_length_are_dynamic(gpt2, tokens):
    hf = hf_model("gpt2")
    for shape in [(1, 1), (1, 5), (3, 11), (5, 2)]:
        t = torch.randint(7, 500, shape)
        with torch.no_grad():
            want = hf(t).logits
        assert (gpt2(t) - want).abs().max() <= ATOL, shape


def test_tokenizer_helpers_follow_transformerlens(gpt2):
    bos = gpt2.tokenizer.bos_token_id
    text = gpt2.to_string(torch.tensor([10, 11, 12]))
    toks = gpt2.to_tokens(text)
    assert toks[0, 0].item() == bos and toks.shape == (1, 4)
    assert gpt2.to_tokens(text, prepend_bos=False).shape == (1, 3)
    assert gpt2.to_str_tokens(text)[0] == gpt2.tokenizer.bos_token
    assert len(gpt2.to_str_tokens(text, prepend_bos=False)) == 3
    batch = gpt2.to_tokens([text, gpt2.to_string(torch.tensor([10]))])
    assert batch.shape == (2, 4)
    # text input goes through to_tokens
    assert torch.equal(gpt2(text), gpt2(toks))


def test_cfg_has_transformerlens_fields():
    from conftest import oracle_hooks
    for arch in ["gpt2", "gpt_neox", "llama", "opt"]:
        model = oracle_model(arch)
        want = oracle_hooks(arch)["tl_cfg"]
        for key in ["d_model", "d_head", "n_layers", "n_ctx", "n_heads", "d_mlp", "d_vocab",
                    "gated_mlp", "normalization_type", "positional_embedding_type",
                    "parallel_attn_mlp", "rotary_dim", "final_rms"]:
            assert getattr(model.cfg, key) == want[key], (arch, key)
        assert (model.cfg.n_key_value_heads or None) == want["n_key_value_heads"], arch
        assert model.cfg.act_fn == want["act_fn"] or arch == "llama"
