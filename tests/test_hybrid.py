"""Blocks whose token mixer computes no attention scores (issue 10): state-space
and linear-attention layers (Mamba, Gated DeltaNet, ...), alone or beside
attention layers. Discovery maps each such block's residual stream
(hook_resid_pre / resid_mid / resid_post), its mixer's output as added to the
stream (`hook_mixer_out`, not TransformerLens's: TL has no sites inside a
mixer), its norm (ln1) and its MLP; the attention blocks of a hybrid keep every
attention site. What needs attention heads (W_Q, per-head results) refuses on
a mixer block with a typed error; generation recomputes the prefix (a KV cache
does not hold a recurrent state).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

import fxlens
from fxlens.errors import FxlensError, UnmappableModelError
from fxlens.runtime.generate import KVCacheWarning

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import support_matrix  # noqa: E402
from conftest import hf_outputs  # noqa: E402

# float32 rounding: the sweep's 1e-4 of the reference's largest magnitude
RTOL = 1e-4


@pytest.fixture(scope="module")
def mamba():
    hf = support_matrix.tiny_model("mamba")
    return hf, fxlens.from_pretrained_no_processing(hf, self_check=False)


def test_state_space_blocks_are_mapped_site_by_site(mamba):
    """Mamba: every block is norm -> mixer -> residual add. hook_mixer_out is the
    mixer module's output, hook_resid_post HF's block output; the cfg says which
    layers have which sublayers; a length other than the exported one gets its own
    graph (Mamba's scan is unrolled over the positions: torch.export specialises
    the length, and capture_info says so)."""
    hf, model = mamba
    info = model.capture_info
    assert info.method == "per-length" and info.seq_range[0] == info.seq_range[1]
    for length in (7, 5):
        ids = torch.randint(0, 500, (2, length), generator=torch.Generator().manual_seed(length))
        want = hf_outputs(hf, ids, {L: layer.mixer for L, layer in enumerate(hf.backbone.layers)})
        logits, cache = model.run_with_cache(ids)
        assert support_matrix.rel_err(logits, want["logits"]) <= RTOL
        for L in range(model.cfg.n_layers):
            assert support_matrix.rel_err(cache[f"blocks.{L}.hook_mixer_out"], want[L]) <= RTOL
            # resid_post = resid_pre + mixer_out, exactly as the graph adds them
            torch.testing.assert_close(cache[f"blocks.{L}.hook_resid_post"],
                                       cache[f"blocks.{L}.hook_resid_pre"] + cache[f"blocks.{L}.hook_mixer_out"])
        # HF's Mamba lists block outputs as its hidden states (no embedding first)
        assert support_matrix.rel_err(cache["blocks.0.hook_resid_post"], want["hidden"][0]) <= RTOL
    assert [lc.token_mixer for lc in model.cfg.layers] == ["mixer", "mixer"]
    assert not any(lc.has_mlp for lc in model.cfg.layers)
    assert model.cfg.n_heads == 0 and model.cfg.d_mlp is None
    assert not any(".attn." in n for n in model.hook_names)


def test_ablating_the_mixer_output_matches_hf(mamba):
    """A hook returning zeros at blocks.0.hook_mixer_out gives HF's logits with the
    first mixer's output zeroed."""
    hf, model = mamba
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(1))
    handle = hf.backbone.layers[0].mixer.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    try:
        with torch.no_grad():
            want = hf(ids, use_cache=False).logits
    finally:
        handle.remove()
    got = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_mixer_out", lambda x, hook: torch.zeros_like(x))])
    assert support_matrix.rel_err(got, want) <= RTOL
    with torch.no_grad():
        plain = hf(ids, use_cache=False).logits
    assert support_matrix.rel_err(plain, want) > 1e-2     # the ablation changes the output


def test_what_needs_heads_refuses_on_a_mixer_block(mamba):
    """No W_Q / W_O / per-head results on a block without attention: typed errors
    naming the block's mixer; decompose_resid splits the stream by sublayer."""
    hf, model = mamba
    with pytest.raises(UnmappableModelError, match="no attention .its token mixer backbone.layers.0.mixer"):
        model.blocks[0].attn.W_Q
    with pytest.raises(UnmappableModelError, match="no attention"):
        model.blocks[1].attn.b_O
    ids = torch.randint(0, 500, (1, 6), generator=torch.Generator().manual_seed(2))
    with pytest.raises(FxlensError, match="block 0 has no attention"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_result", lambda x, hook: x)])
    model.set_use_attn_result(True)        # no block has heads: nothing to materialise
    assert not any("hook_result" in n for n in model.hook_names)
    _, cache = model.run_with_cache(ids)
    with pytest.raises(FxlensError, match="block 0 has no attention heads"):
        cache.stack_head_results()
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "0_mixer_out", "1_mixer_out"]
    torch.testing.assert_close(stack.sum(0), cache["blocks.1.hook_resid_post"])


def test_generation_recomputes_the_prefix(mamba):
    """A KV cache does not hold a recurrent state: generate says so once and runs
    the full graph each step; greedy tokens equal HF's own greedy loop."""
    hf, model = mamba
    prompt = torch.randint(0, 500, (1, 5), generator=torch.Generator().manual_seed(3))
    with pytest.warns(KVCacheWarning, match="recurrent state"):
        got = model.generate(prompt, max_new_tokens=2, stop_at_eos=False, do_sample=False, verbose=False)
    tokens = prompt
    with torch.no_grad():
        for _ in range(2):
            nxt = hf(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
    assert torch.equal(got, tokens)


def test_a_hybrid_of_convolution_and_attention_layers():
    """LFM (lfm3): short-convolution layers 0 and 3, attention layers 1 and 2, each
    with a pre- and a post-norm around both sublayers. The conv layers' mixer
    output is what their post_operator_norm adds, the attention layers keep their
    sites (pattern = HF's attentions); both kinds have their MLP; the residual
    stack splits by each layer's sublayers; the processed model (norms folded)
    keeps HF's logits; weights exist for the attention layers only."""
    hf = support_matrix.tiny_model("lfm3")
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(5))
    # what each sublayer adds: its post-norm's output
    added = {(short, L): mod for L, layer in enumerate(hf.model.layers)
             for short, mod in (("mixer" if hasattr(layer, "conv") else "attn", layer.post_operator_norm),
                                ("mlp", layer.post_ffn_norm))}
    want = hf_outputs(hf, ids, added, output_attentions=True)
    model = fxlens.from_pretrained_no_processing(hf, self_check=False)
    assert [lc.token_mixer for lc in model.cfg.layers] == ["mixer", "attn", "attn", "mixer"]
    assert all(lc.has_mlp for lc in model.cfg.layers) and model.cfg.n_heads == 4
    logits, cache = model.run_with_cache(ids)
    assert support_matrix.rel_err(logits, want["logits"]) <= RTOL
    for kind, L in added:
        assert support_matrix.rel_err(cache[f"blocks.{L}.hook_{kind}_out"], want[kind, L]) <= RTOL, (kind, L)
        assert support_matrix.rel_err(cache[f"blocks.{L}.hook_resid_pre"], want["hidden"][L]) <= RTOL
    for L, pattern in zip((1, 2), want["attentions"]):     # HF lists the attention layers' patterns only
        torch.testing.assert_close(cache[f"blocks.{L}.attn.hook_pattern"], pattern, rtol=1e-5, atol=1e-6)
    assert "blocks.0.ln1_post.hook_scale" in cache and "blocks.0.attn.hook_pattern" not in cache
    stack, labels = cache.decompose_resid(layer=3, return_labels=True)
    assert labels == ["embed", "0_mixer_out", "0_mlp_out", "1_attn_out", "1_mlp_out", "2_attn_out", "2_mlp_out"]
    torch.testing.assert_close(stack.sum(0), cache["blocks.3.hook_resid_pre"], rtol=1e-5, atol=1e-5)
    assert model.blocks[1].attn.W_Q.shape == (4, 64, 16)
    with pytest.raises(UnmappableModelError, match="no attention"):
        model.blocks[0].attn.W_O
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processed = fxlens.from_pretrained(hf, self_check=False)
    assert support_matrix.rel_err(processed(ids).log_softmax(-1), want["logits"].log_softmax(-1)) <= RTOL


def test_a_linear_over_the_positions_is_a_token_mixer():
    """A mixer that is a linear map over the positions (an MLP-Mixer-style token
    mixing, put in place of a Mamba block's mixer) is found as a mixer, not an MLP:
    nothing in it convolves or scans, but its product runs over the positions axis.
    The embedding is scaled by a constant (as Gemma's and RecurrentGemma's): the
    residual walk stops at the block input, not at the embedding behind it."""
    class TokenMix(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(8, 8, bias=False)

        def forward(self, x, **kwargs):
            return self.mix(x.transpose(1, 2)).transpose(1, 2)

    hf = support_matrix.tiny_model("mamba")
    hf.backbone.layers[0].mixer = TokenMix()
    hf.backbone.embeddings.register_forward_hook(lambda m, args, out: out * 8.0)
    ids = torch.randint(0, 500, (2, 8), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
    model = fxlens.from_pretrained_no_processing(hf, self_check=False)
    assert [lc.token_mixer for lc in model.cfg.layers] == ["mixer", "mixer"]
    logits, cache = model.run_with_cache(ids)
    assert support_matrix.rel_err(logits, want) <= RTOL
    assert "blocks.0.hook_mixer_out" in cache and "blocks.0.hook_mlp_out" not in cache


def test_compiled_model_says_when_a_length_runs_eagerly(mamba):
    """The captured Mamba graph holds for one length only: a compiled model runs
    other lengths on their eager per-length graphs, and says so once per length.
    (Last in this file: it compiles the module's model.)"""
    from fxlens.runtime.compiled import CompileFallbackWarning
    hf, model = mamba
    model.compile()
    ids = torch.randint(0, 500, (2, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
    with pytest.warns(CompileFallbackWarning, match=r"\[2, 5\] input runs eagerly.*lengths 8..8"):
        got = model(ids)
    assert support_matrix.rel_err(got, want) <= RTOL
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        model(ids)                                     # once per length
    assert model.compile_stats()["compilations"] == 0
