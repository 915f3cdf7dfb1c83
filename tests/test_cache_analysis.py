"""ActivationCache analysis (TransformerLens's accumulated_resid, decompose_resid,
stack_head_results, apply_ln_to_stack, logit_attrs, get_full_resid_decomposition,
neuron results) and the model-side helpers they call (loss_fn,
tokens_to_residual_directions, accumulated_bias, ln_final).

The decompositions are checked against the cached residual stream they must
add up to, per-head results against TransformerLens's own `attn.hook_result`,
and the norm scaling against the cached norm outputs.
"""

import functools
import warnings

import pytest
import torch

import fxlens
from conftest import RTOL, captured, oracle, oracle_model, rel_err

# A decomposition re-associates float32 sums of up to n_layers * (n_heads + d_mlp)
# ~ 800 terms; that moves the total by ~1e-6 of its largest entry (measured up to
# 1.2e-6 on these models). 1e-5 of the largest entry allows for it and still
# catches a missing bias or a wrong head (each is >1e-2 of the stream here).
SUM_RTOL = 1e-5


@functools.lru_cache(maxsize=None)
def run(arch: str, mode: str):
    """(model, tokens, logits, cache) for the oracle tokens, weights raw or processed."""
    if mode == "raw":
        model = oracle_model(arch)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # RMS models warn that centring writers is skipped
            model = fxlens.from_pretrained(captured(arch))
    tokens = oracle(arch, "tokens")["tokens"]
    logits, cache = model.run_with_cache(tokens)
    return model, tokens, logits, cache


@pytest.fixture(params=["raw", "processed"])
def mode(request):
    return request.param


def resid_into(cache, layer: int, mlp_input: bool = False):
    """The residual stream that layer `layer`'s attention (MLP) reads; the unembed's at n_layers."""
    n, parallel = cache.model.cfg.n_layers, cache.model.cfg.parallel_attn_mlp
    if layer == n:
        return cache["resid_post", n - 1]
    return cache["resid_mid", layer] if mlp_input and not parallel else cache["resid_pre", layer]


def test_decompose_resid_adds_up_to_the_residual_stream(arch, mode):
    model, _, _, cache = run(arch, mode)
    n = model.cfg.n_layers
    for layer in range(n + 1):
        assert rel_err(cache.decompose_resid(layer).sum(0), resid_into(cache, layer)) <= SUM_RTOL, layer
        if layer < n:
            got = cache.decompose_resid(layer, mlp_input=True).sum(0)
            assert rel_err(got, resid_into(cache, layer, mlp_input=True)) <= SUM_RTOL, layer
    stack, labels = cache.decompose_resid(return_labels=True)
    embeds = ["embed"] + (["pos_embed"] if model.cfg.positional_embedding_type == "standard" else [])
    assert labels == embeds + [f"{l}_{k}_out" for l in range(n) for k in ("attn", "mlp")]
    assert stack.shape == (len(labels), *cache["resid_pre", 0].shape)
    attn, mlp = cache.decompose_resid(mode="attn", incl_embeds=False), cache.decompose_resid(mode="mlp", incl_embeds=False)
    assert rel_err(torch.cat([attn, mlp]).sum(0), stack[len(embeds):].sum(0)) <= SUM_RTOL
    last = cache.decompose_resid(pos_slice=-1)
    assert torch.equal(last, stack[:, :, -1])


def test_accumulated_resid_stacks_the_cached_stream(arch):
    model, _, _, cache = run(arch, "raw")
    n = model.cfg.n_layers
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == [f"{l}_pre" for l in range(n)] + ["final_post"]
    want = [cache["resid_pre", l] for l in range(n)] + [cache["resid_post", n - 1]]
    assert torch.equal(stack, torch.stack(want))
    _, labels = cache.accumulated_resid(1, mlp_input=True, return_labels=True)
    if model.cfg.parallel_attn_mlp:
        assert labels == ["0_pre", "1_pre"]      # the MLP reads resid_pre
        with pytest.raises(fxlens.FxlensError, match="no resid_mid"):
            cache.accumulated_resid(incl_mid=True)
    else:
        assert labels == ["0_pre", "1_pre", "1_mid"]
        stack, labels = cache.accumulated_resid(2, incl_mid=True, return_labels=True)
        assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre"]
        assert torch.equal(stack[3], cache["resid_mid", 1])


def test_head_results_match_transformerlens_and_sum_to_attn_out(arch, mode):
    model, _, _, cache = run(arch, mode)
    n, h = model.cfg.n_layers, model.cfg.n_heads
    ref = oracle(arch, f"{mode}_extra")
    stack, labels = cache.stack_head_results(return_labels=True)
    assert labels == [f"L{l}H{i}" for l in range(n) for i in range(h)]
    for l in range(n):
        per_head = stack[l * h:(l + 1) * h]                    # [head, batch, pos, d_model]
        # computed from hook_z @ W_O; TransformerLens cached its own hook_result
        assert rel_err(per_head.movedim(0, -2), ref[f"blocks.{l}.attn.hook_result"]) <= RTOL, l
        assert rel_err(per_head.sum(0) + model.blocks[l].attn.b_O, cache["attn_out", l]) <= SUM_RTOL, l
    # the remainder makes the stack add up to the final residual stream
    stack, labels = cache.stack_head_results(incl_remainder=True, return_labels=True)
    assert labels[-1] == "remainder"
    assert rel_err(stack.sum(0), cache["resid_post", n - 1]) <= SUM_RTOL
    assert cache.stack_head_results(0).shape == (0, *cache["resid_pre", 0].shape)


def test_full_resid_decomposition_adds_up(arch, mode):
    model, _, _, cache = run(arch, mode)
    n, h, d_mlp = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_mlp
    embeds = ["embed"] + (["pos_embed"] if model.cfg.positional_embedding_type == "standard" else [])
    stack, labels = cache.get_full_resid_decomposition(return_labels=True)
    assert labels == ([f"L{l}H{i}" for l in range(n) for i in range(h)] +
                      [f"L{l}N{i}" for l in range(n) for i in range(d_mlp)] + embeds + ["bias"])
    assert rel_err(stack.sum(0), resid_into(cache, n)) <= SUM_RTOL
    for layer, mlp_input in ((0, False), (1, True), (2, False)):
        for expand in (True, False):
            got = cache.get_full_resid_decomposition(layer, mlp_input=mlp_input, expand_neurons=expand)
            assert rel_err(got.sum(0), resid_into(cache, layer, mlp_input)) <= SUM_RTOL, (layer, mlp_input, expand)
    _, labels = cache.get_full_resid_decomposition(2, expand_neurons=False, return_labels=True)
    assert labels[2 * h:] == ["0_mlp_out", "1_mlp_out"] + embeds + ["bias"]


def test_apply_ln_to_stack_gives_the_norms_outputs(arch, mode):
    model, _, _, cache = run(arch, mode)
    n = model.cfg.n_layers
    # scaling by the cached scale is linear: the scaled components sum to `normalized`
    for layer, mlp_input, site in ((n, False, "ln_final.hook_normalized"), (1, False, "blocks.1.ln1.hook_normalized"),
                                   (1, True, "blocks.1.ln2.hook_normalized")):
        parts = cache.decompose_resid(layer, mlp_input=mlp_input, apply_ln=True)
        assert rel_err(parts.sum(0), cache[site]) <= SUM_RTOL, site
        whole = cache.apply_ln_to_stack(resid_into(cache, layer, mlp_input)[None], layer, mlp_input=mlp_input)
        assert rel_err(whole[0], cache[site]) <= SUM_RTOL, site
    # slices pick the matching rows of the cached scale
    full = cache.apply_ln_to_stack(cache.decompose_resid())
    assert rel_err(cache.apply_ln_to_stack(cache.decompose_resid(pos_slice=-1), pos_slice=-1), full[:, :, -1]) <= SUM_RTOL
    assert rel_err(cache.apply_ln_to_stack(cache.decompose_resid(), batch_slice=1), full[:, 1]) <= SUM_RTOL
    # the logit lens renormalises each entry and applies the final norm's weights:
    # the last entry is exactly what the unembed reads
    lens = cache.accumulated_resid(apply_ln=True)
    assert rel_err(lens[-1], cache["unembed.hook_in"]) <= SUM_RTOL
    assert rel_err(model.ln_final(cache["resid_post", n - 1]), cache["unembed.hook_in"]) <= SUM_RTOL


def test_logit_attrs_add_up_to_the_logits(arch):
    # processed weights: the final norm's weights are folded into W_U, so
    # ln_final(resid) @ W_U + b_U are the logits and the attributions of a full
    # decomposition sum to logit - b_U at each position
    model, tokens, logits, cache = run(arch, "processed")
    stack = cache.get_full_resid_decomposition(expand_neurons=False)
    attrs = cache.logit_attrs(stack, tokens)                      # [component, batch, pos]
    assert attrs.shape == stack.shape[:-1]
    want = logits.gather(-1, tokens[..., None])[..., 0] - model.b_U[tokens]
    assert rel_err(attrs.sum(0), want) <= SUM_RTOL
    # a logit difference cancels b_U too when the two tokens' biases are subtracted
    diff = cache.logit_attrs(stack, 5, incorrect_tokens=7).sum(0)
    assert rel_err(diff, logits[..., 5] - logits[..., 7] - (model.b_U[5] - model.b_U[7])) <= SUM_RTOL
    # one position: slice the stack, and say which positions the slice took
    last = cache.logit_attrs(stack[:, :, -1], tokens[:, -1], pos_slice=-1)
    assert rel_err(last, attrs[:, :, -1]) <= SUM_RTOL
    with pytest.raises(ValueError, match="same shape"):
        cache.logit_attrs(stack, tokens, incorrect_tokens=tokens[:, :2])


def test_neuron_results_sum_to_mlp_out(arch, mode):
    model, _, _, cache = run(arch, mode)
    mlp = model.blocks[1].mlp
    results = cache.get_neuron_results(1)                            # [batch, pos, d_mlp, d_model]
    assert rel_err(results.sum(-2) + mlp.b_out, cache["mlp_out", 1]) <= SUM_RTOL
    direction = model.W_U[:, 3]
    assert rel_err(cache.get_neuron_results(1, project_output_onto=direction), results @ direction) <= SUM_RTOL
    stack, labels = cache.stack_neuron_results(2, neuron_slice=(0, 5), return_labels=True, incl_remainder=True)
    assert labels == [f"L{l}N{i}" for l in range(2) for i in range(5)] + ["remainder"]
    assert rel_err(stack.sum(0), cache["resid_post", 1]) <= SUM_RTOL
    assert torch.equal(cache.stack_activation("pattern"),
                       torch.stack([cache["pattern", l] for l in range(model.cfg.n_layers)]))


def test_analysis_without_a_batch_dim(arch):
    model, tokens, _, cache = run(arch, "processed")
    one = cache.apply_slice_to_batch_dim(1)
    assert not one.has_batch_dim
    full = cache.decompose_resid(apply_ln=True)
    assert rel_err(one.decompose_resid(apply_ln=True), full[:, 1]) <= SUM_RTOL
    got = one.logit_attrs(one.decompose_resid(pos_slice=-1), tokens[1, -1], pos_slice=-1, has_batch_dim=False)
    assert rel_err(got, cache.logit_attrs(cache.decompose_resid(), tokens)[:, 1, -1]) <= SUM_RTOL


def test_compute_head_results_fills_the_cache_in_order():
    model, _, _, cache = run("llama", "processed")
    copy = fxlens.ActivationCache(dict(cache.cache_dict), model)
    copy.compute_head_results()
    names = list(copy.keys())
    assert names.index("blocks.0.attn.hook_result") == names.index("blocks.0.attn.hook_z") + 1
    assert copy["result", 2].shape == (*cache["z", 2].shape[:-1], model.cfg.d_model)


def test_loss_fn_and_token_directions():
    model, tokens, logits, _ = run("gpt2", "raw")
    per_token = model.loss_fn(logits, tokens, per_token=True)
    assert per_token.shape == (2, tokens.shape[1] - 1)
    assert torch.allclose(per_token, model(tokens, return_type="loss", loss_per_token=True))
    assert torch.allclose(model.loss_fn(logits, tokens), per_token.mean())
    # a masked token drops the predictions of it and from it
    mask = torch.ones_like(tokens)
    mask[0, 3] = 0
    masked = model.loss_fn(logits, tokens, attention_mask=mask, per_token=True)
    assert masked[0, 2] == 0 and masked[0, 3] == 0 and masked[0, 4] == per_token[0, 4]
    keep = torch.ones_like(per_token, dtype=torch.bool)
    keep[0, 2:4] = False
    assert torch.allclose(model.loss_fn(logits, tokens, attention_mask=mask), per_token[keep].mean())
    W_U = model.W_U
    assert torch.equal(model.tokens_to_residual_directions(5), W_U[:, 5])
    assert torch.equal(model.tokens_to_residual_directions(torch.tensor([5])), W_U[:, 5])
    assert model.tokens_to_residual_directions(tokens).shape == (*tokens.shape, model.cfg.d_model)
    assert torch.equal(model.tokens_to_residual_directions(tokens)[1, 2], W_U[:, tokens[1, 2]])
