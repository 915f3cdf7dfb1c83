"""The support sweep's CI-sized subset (scripts/support_matrix.py runs every model type).

One model type per capture route the sweep found: `gpt2` exports with named
batch/sequence Dims; `gpt_neo` only with `Dim.DYNAMIC` (torch.export narrows
the sequence to 2.., so one-token inputs take the per-length fallback);
`granitemoe` takes `use_cache` through **kwargs (the export spec must not name
it) and routes its MLP through experts. Each row is checked as the sweep checks
it: log-probs equal HF's (relative 1e-4), the core sites in every layer,
hook_resid_pre equal to HF's hidden states, pattern rows summing to 1, and the
processed model's log-probs equal HF's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fxlens

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import support_matrix  # noqa: E402
from conftest import hf_outputs  # noqa: E402

SUBSET = {"gpt2": "dims", "gpt_neo": "dynamic", "granitemoe": "dims"}


@pytest.mark.parametrize("model_type", list(SUBSET))
def test_support_row_passes(model_type):
    row = support_matrix.check_type(model_type)
    assert row["status"] == "pass", row["reason"]
    assert row["processed"] == "pass", row["processed_reason"]
    assert row["capture"].startswith(SUBSET[model_type])
    assert {"hook_resid_pre", "attn.hook_pattern", "hook_mlp_out"} <= set(row["sites"])


def test_lengths_outside_the_exported_range_get_their_own_graph():
    hf = support_matrix.tiny_model("gpt_neo")
    model = fxlens.from_pretrained_no_processing(hf)
    assert model.capture_info.method == "dynamic" and model.capture_info.seq_range[0] == 2
    for shape in [(2, 1), (1, 1), (2, 5)]:
        ids = torch.randint(0, 500, shape, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            want = hf(ids, use_cache=False).logits
        seen = []
        got = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: seen.append(x))])
        # float32 rounding stays ~1e-6 of the logits' size
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        assert len(seen) == 1 and seen[0].shape[1] == shape[1]   # the model's own hook ran
    assert list(model._length_graphs) == [(0, 1)]   # one graph for length 1, reused for batch 1 and 2
    from fxlens.tools.dump import render
    assert "capture: dynamic (seq 2..128" in render(model.graph_module, "txt")


@pytest.mark.parametrize("model_type", ["xglm", "trocr"])
def test_heads_folded_into_the_batch_softmax(model_type):
    """XGLM and TrOCR (post-LN: its blocks end in a norm of resid_mid + mlp_out)
    softmax [batch*head, query, key] scores between two bmms: the pattern is that
    softmax shown as [batch, head, query, key], equal to HF's attentions; the scores
    (the [batch, head, query, key] value before the fold, mask added) softmax to it;
    a pattern hook's return value is what pattern@V reads."""
    hf = support_matrix.tiny_model(model_type)
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = hf(ids, use_cache=False, output_attentions=True)
    model = fxlens.from_pretrained_no_processing(hf)
    logits, cache = model.run_with_cache(ids)
    # float32 rounding, ~1e-7 of the log-probs in the sweep
    assert support_matrix.rel_err(logits.log_softmax(-1), out.logits.log_softmax(-1)) <= 1e-4
    for L, want in enumerate(out.attentions):
        got = cache[f"blocks.{L}.attn.hook_pattern"]
        assert got.shape == want.shape == (2, model.cfg.n_heads, 7, 7)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cache[f"blocks.{L}.attn.hook_attn_scores"].softmax(-1), want,
                                   rtol=1e-5, atol=1e-6)
    # a uniform pattern over the causal prefix: z becomes the mean of the values so far
    def uniform(p, hook):
        return torch.tril(torch.ones_like(p)) / torch.arange(1, p.shape[-1] + 1, dtype=p.dtype)[:, None]

    seen = {}
    model.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_pattern", uniform),
                                         ("blocks.0.attn.hook_v", lambda v, hook: seen.setdefault("v", v)),
                                         ("blocks.0.attn.hook_z", lambda z, hook: seen.setdefault("z", z))])
    mean_v = seen["v"].cumsum(1) / torch.arange(1, 8, dtype=seen["v"].dtype)[None, :, None, None]
    torch.testing.assert_close(seen["z"], mean_v, rtol=1e-5, atol=1e-6)


def test_gemma4_post_norms_per_layer_branch_and_layer_gain():
    """Gemma 4 (issue 10): RMSNorms spelt x * pow(mean(x^2) + eps, -0.5) are norms
    (ln1/ln1_post/ln2/ln2_post, the weightless v norm), a per-layer-input branch after
    the MLP is extra_out (not the MLP: hook_post is the MLP's), and the learned
    layer_scalar ending the block leaves resid_post = gain * (resid_mid2 + extra_out)."""
    hf = support_matrix.tiny_model("gemma4_text")
    gains = (0.7, 1.3)
    with torch.no_grad():
        for layer, gain in zip(hf.model.layers, gains):
            layer.layer_scalar.fill_(gain)     # 1 at init: set off it so the gain shows
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(2))
    lay = hf.model.layers[0]
    want = hf_outputs(hf, ids, {"attn_out": lay.post_attention_layernorm, "mlp_out": lay.post_feedforward_layernorm,
                                 "post<": lay.mlp.down_proj, "extra": lay.post_per_layer_input_norm,
                                 "v_norm": lay.self_attn.v_norm})
    model = fxlens.from_pretrained_no_processing(hf, self_check=False)
    logits, cache = model.run_with_cache(ids)
    # float32 rounding stays ~1e-6 of each value's size; a wrong site is off by O(1)
    close = lambda got, ref: (got - ref).abs().max() <= 1e-5 * ref.abs().max()  # noqa: E731
    assert close(logits.log_softmax(-1), want["logits"].log_softmax(-1))
    b = lambda s: cache[f"blocks.0.{s}"]  # noqa: E731
    assert close(b("hook_attn_out"), want["attn_out"]) and close(b("hook_mlp_out"), want["mlp_out"])
    assert close(b("mlp.hook_post"), want["post<"]) and close(b("hook_extra_out"), want["extra"])
    # the weightless v norm's output is its normalized value, as [b*s*h, d_head] rows like q/k norms'
    assert close(b("attn.v_norm.hook_normalized"), want["v_norm"].reshape(-1, want["v_norm"].shape[-1]))
    for L, gain in enumerate(gains):
        b = lambda s: cache[f"blocks.{L}.{s}"]  # noqa: E731
        assert torch.allclose(b("hook_resid_pre") + b("hook_attn_out"), b("hook_resid_mid"), atol=1e-6)
        assert torch.allclose(b("hook_resid_mid") + b("hook_mlp_out"), b("hook_resid_mid2"), atol=1e-6)
        assert torch.allclose(gain * (b("hook_resid_mid2") + b("hook_extra_out")), b("hook_resid_post"), atol=1e-5)
        assert torch.allclose(gain * b("hook_resid_unscaled"), b("hook_resid_post"), atol=1e-5)
        assert close(b("hook_resid_pre"), want["hidden"][L])
    assert close(cache["blocks.0.hook_resid_post"], want["hidden"][1])
    for site in ("ln1", "ln1_post", "ln2", "ln2_post"):
        assert f"blocks.1.{site}.hook_normalized" in cache
    processed = fxlens.from_pretrained(hf, self_check=False)
    with torch.no_grad():
        assert close(processed(ids).log_softmax(-1), want["logits"].log_softmax(-1))


def test_sparse_attention_indexer_is_part_of_the_mask():
    """DeepSeek-V3.2's indexer (the DSA family: glm_moe_dsa, axk2, dots3_note) scores
    keys with a second product of the queries' latent, keeps the top k and masks
    the rest: integer indices scattered into a boolean mask, not a term added to
    QK^T. With index_topk below the length the mask is live: each pattern row
    holds at most k keys, equal to HF's attentions; generation recomputes the
    prefix (the indexer's keys have no cache) and gives HF's tokens."""
    from transformers import AutoModelForCausalLM
    cfg = support_matrix.tiny_config("deepseek_v32")
    cfg.index_topk = 3           # the sweep's 2048 keeps every key of a 7-token input
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = hf(ids, use_cache=False, output_attentions=True)
        want_tokens = hf.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    model = fxlens.from_pretrained_no_processing(hf, self_check=False)
    logits, cache = model.run_with_cache(ids)
    # float32 rounding, ~1e-7 of the log-probs in the sweep
    assert support_matrix.rel_err(logits.log_softmax(-1), out.logits.log_softmax(-1)) <= 1e-4
    for L, want in enumerate(out.attentions):
        got = cache[f"blocks.{L}.attn.hook_pattern"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert int((got > 0).sum(-1).max()) == 3      # the top-3 keys of every later query
    from fxlens.runtime.generate import KVCacheWarning
    with pytest.warns(KVCacheWarning, match="recomputing the prefix"):
        tokens = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens, want_tokens)


def test_learned_gain_and_bias_on_a_branch_before_its_residual_add():
    """ZAYA's residual scaling joins each sublayer as (branch + b) * s + (resid + b') * s'
    (per-channel parameters, moved off their init by the sweep's perturbation): the
    bias add after o_proj is the scaling module's, not a bias of o_proj, so the output
    projection is found, and hook_attn_out / hook_mlp_out are what each branch adds,
    (branch + b) * s; resid_mid and resid_post are HF's sums; ln1 is the norm read
    through the padding mask multiplied in before the projections. Its CCA attention builds
    q and k from a convolution over both projections' outputs and v from the current
    and the previous token's projections: no W_Q/W_K/W_V, named."""
    hf = support_matrix.tiny_model("zaya")
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(2))
    cap = fxlens.capture(hf)          # one export for the raw and the processed model
    model = fxlens.from_pretrained_no_processing(cap, self_check=False)
    got, handles = {}, []
    for L, lay in enumerate(hf.model.layers):
        for key, mod in (("attn", lay.post_attention_residual_scale), ("mlp", lay.post_mlp_residual_scale)):
            handles.append(mod.register_forward_hook(
                lambda m, a, o, k=(key, L): got.__setitem__(k, ((a[0] + m.hidden_states_bias) * m.hidden_states_scale,
                                                                o))))
        handles.append(lay.input_layernorm.register_forward_hook(
            lambda m, a, o, k=("ln1", L): got.__setitem__(k, o / m.weight)))
    with torch.no_grad():
        out = hf(ids, use_cache=False, output_hidden_states=True, output_attentions=True)
    for h in handles:
        h.remove()
    logits, cache = model.run_with_cache(ids)
    # float32 rounding stays ~1e-6 of each value's size; a wrong site is off by O(1)
    close = lambda got, ref: (got - ref).abs().max() <= 1e-5 * ref.abs().max()  # noqa: E731
    assert close(logits.log_softmax(-1), out.logits.log_softmax(-1))
    for L in range(len(hf.model.layers)):
        b = lambda s: cache[f"blocks.{L}.{s}"]  # noqa: E731
        (attn_added, resid_mid), (mlp_added, resid_post) = got[("attn", L)], got[("mlp", L)]
        assert close(b("hook_resid_pre"), out.hidden_states[L])
        assert close(b("attn.hook_pattern"), out.attentions[L])
        assert close(b("hook_attn_out"), attn_added) and close(b("hook_resid_mid"), resid_mid)
        assert close(b("hook_mlp_out"), mlp_added) and close(b("hook_resid_post"), resid_post)
        # ln1 is found through the padding mask multiplied in before the projections
        assert close(b("ln1.hook_normalized"), got[("ln1", L)])
    for w, role in (("W_Q", "q"), ("W_K", "k"), ("W_V", "v")):
        with pytest.raises(fxlens.UnmappableModelError, match=f"{role} is assembled in .* from several projections"):
            getattr(model.blocks[0].attn, w)
    processed = fxlens.from_pretrained(cap, self_check=False)
    with torch.no_grad():
        assert close(processed(ids).log_softmax(-1), out.logits.log_softmax(-1))


def test_learned_gate_on_a_branch_before_its_residual_add():
    """Ergo's residual gate adds sigmoid(w) * norm(branch) to sqrt(1 + sigmoid(w)) *
    exp(-softplus(w) / 2) * resid: hook_attn_out is the gated branch as added, after
    the post-attention norm (ln1_post); log-probs (raw and processed) and every
    layer's resid_pre are HF's, as the sweep checks them."""
    hf = support_matrix.tiny_model("ergo")
    ids = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(2))
    lay = hf.model.layers[0]
    cap = fxlens.capture(hf)          # one export for the raw and the processed model
    model = fxlens.from_pretrained_no_processing(cap, self_check=False)
    want = hf_outputs(hf, ids, {"normed": lay.post_attention_layernorm, "resid_mid": lay.attention_residual_gate})
    logits, cache = model.run_with_cache(ids)
    # float32 rounding, ~1e-7 of the log-probs in the sweep
    assert support_matrix.rel_err(logits.log_softmax(-1), want["logits"].log_softmax(-1)) <= 1e-4
    for L in range(model.cfg.n_layers):
        assert support_matrix.rel_err(cache[f"blocks.{L}.hook_resid_pre"], want["hidden"][L]) <= 1e-4
    processed = fxlens.from_pretrained(cap, self_check=False)
    with torch.no_grad():
        assert support_matrix.rel_err(processed(ids).log_softmax(-1), want["logits"].log_softmax(-1)) <= 1e-4
    gate = lay.attention_residual_gate.weight.float().sigmoid()
    # float32 rounding; a site before the gate is off by a factor of about 2
    torch.testing.assert_close(cache["blocks.0.hook_attn_out"], gate * want["normed"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache["blocks.0.hook_resid_mid"], want["resid_mid"], rtol=1e-5, atol=1e-6)


# structures refused with what was found (issue 10): the reason names the structure
REFUSED = {
    "jetmoe": "routed attention experts",       # mixture of attention heads: q from routed experts
    "diffllama": "differential attention",      # (softmax_1 - lambda * softmax_2) @ V
    "dory": "recurrent section reusing its layers",   # the same block module called per loop
    "xlnet": "a relative-position term",        # QK^T einsum plus a second einsum of the queries
    # several residual streams per position: AltUp's [4, b, s, d] predictions, one active (the
    # same refusal as hyper-connections' [b, s, 4, d]: deepseek_v4 and hy_v4, which the sweep
    # checks -- hy_v4's capture took 34-40 s of the suite)
    "gemma3n_text": "4 residual streams per position",
    # a softmax over a [b, s, n, d] stack of earlier blocks' states makes each sublayer's input
    # (inkling2_loop_text has the same blocks: the sweep checks it)
    "inkling2_text": "block attention residuals: .* a learned mixture of earlier blocks' outputs",
}


def test_a_layer_spread_over_parallel_module_lists_is_one_block():
    """XLM keeps layer L in attentions[L], layer_norm1[L], ffns[L], layer_norm2[L] and
    adds the residuals in their parent, multiplying the stream by a padding mask
    (tokens equal to pad_index) after each layer; it also builds its own KV cache,
    concatenating an empty past to k and v. Block L is the four entries and the
    parent's adds between them: its sites are HF's module outputs and hidden states,
    padded positions included, and an empty past is no computation on k (no rot_k)."""
    hf = support_matrix.tiny_model("xlm")
    model = fxlens.from_pretrained_no_processing(hf, self_check=False)
    ids = torch.randint(5, 500, (2, 7), generator=torch.Generator().manual_seed(4))
    ids[1, 4:] = hf.config.pad_index        # zeroed in the stream after each layer
    t = hf.transformer
    want = hf_outputs(hf, ids, {"attn_out": t.attentions[1], "mlp_out": t.ffns[1], "ln1": t.layer_norm1[1]})
    # HF, given no mask, masks the pad tokens itself; the graph takes the mask as an input
    assert model.capture_info.pad_masked == hf.config.pad_index
    with pytest.raises(fxlens.PaddingError, match="holds? the pad token"):
        model(ids)
    logits, cache = model.run_with_cache(ids, attention_mask=ids != hf.config.pad_index)
    # float32 rounding of the same ops in another order: ~1e-6 of the values' size
    torch.testing.assert_close(logits, want["logits"], rtol=1e-5, atol=1e-5)
    for L in range(model.cfg.n_layers):
        torch.testing.assert_close(cache[f"blocks.{L}.hook_resid_pre"], want["hidden"][L], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cache[f"blocks.{L}.hook_resid_post"], want["hidden"][L + 1], rtol=1e-5, atol=1e-6)
    assert cache["blocks.1.hook_resid_post"][1, 4:].abs().max() == 0       # the padding mask is in the block
    torch.testing.assert_close(cache["blocks.1.hook_attn_out"], want["attn_out"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache["blocks.1.hook_mlp_out"], want["mlp_out"], rtol=1e-5, atol=1e-6)
    # post-LN: layer_norm1[L], after the attention's add, feeds the MLP (ln2, as openai-gpt's
    # ln_1); hook_normalized is the value before its gain and bias
    ln = t.layer_norm1[1]
    torch.testing.assert_close(cache["blocks.1.ln2.hook_normalized"] * ln.weight + ln.bias, want["ln1"],
                               rtol=1e-5, atol=1e-5)
    assert "blocks.0.attn.hook_rot_k" not in model.hook_names
    assert model.cfg.layers[0].token_mixer == "attn" and model.cfg.layers[0].has_mlp
    # an edit at a site changes what follows it as in HF: zero layer 0's MLP
    zero = lambda x, hook: torch.zeros_like(x)  # noqa: E731
    h = t.ffns[0].register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    try:
        with torch.no_grad():
            want_zero = hf(ids, use_cache=False).logits
    finally:
        h.remove()
    got_zero = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_mlp_out", zero)],
                                    attention_mask=ids != hf.config.pad_index)
    torch.testing.assert_close(got_zero, want_zero, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", list(REFUSED))
def test_refused_structure_is_named(model_type):
    hf = support_matrix.tiny_model(model_type)
    with pytest.raises(fxlens.UnmappableModelError, match=REFUSED[model_type]):
        fxlens.from_pretrained_no_processing(hf, self_check=False)


def test_tiny_config_keeps_dependent_fields_consistent():
    """The fields that must agree with the ones the sweep shrinks are shrunk with them:
    gemma4's per-layer overrides follow the layers kept (its global layers' 512-wide
    heads twice the tiny 16), mamba2's head count keeps
    hidden_size * expand == num_heads * head_dim, gemma3n's KV-sharing layer count
    fits the layers kept, kolibri1_1's K/V source layers are renumbered, and each HF
    model builds and runs."""
    g4 = support_matrix.tiny_config("gemma4_text")
    # the first layer (sliding), the first full one and the last (full)
    assert g4.num_hidden_layers == 3 and g4.layer_types == ["sliding_attention", "full_attention", "full_attention"]
    assert [g4.per_layer_config[i].head_dim for i in range(3)] == [16, 32, 32]   # scaled overrides
    m2 = support_matrix.tiny_config("mamba2")
    assert m2.hidden_size * m2.expand == m2.num_heads * m2.head_dim
    g3n = support_matrix.tiny_config("gemma3n_text")
    assert g3n.num_kv_shared_layers < g3n.num_hidden_layers
    assert g3n.intermediate_size == [128] * g3n.num_hidden_layers
    assert g3n.vocab_size_per_layer_input == support_matrix.VOCAB
    # an adapter's widths follow the model widths they equal by default (dots3_note's
    # vision adapter: its own width in, the text model's out)
    d3 = support_matrix.tiny_config("dots3_note")
    assert d3.vision_config.adapter_in_dim == d3.vision_config.hidden_size == 64
    assert d3.vision_config.adapter_out_dim == d3.text_config.hidden_size == 64
    # kolibri1_1: each layer's K/V source (a layer index) renumbered with the layers kept,
    # a layer reading another's kept with its source; its indexer's heads fit one kv group
    ko = support_matrix.tiny_config("kolibri1_1")
    src = ko.kv_source_layers
    assert len(src) == ko.num_hidden_layers and any(s != i for i, s in enumerate(src))
    assert all(src[s] == s and ko.layer_types[s] == ko.layer_types[i] for i, s in enumerate(src))
    assert ko.index_num_heads <= ko.num_attention_heads // ko.num_key_value_heads
    for t in ("gemma4_text", "mamba2", "gemma3n_text", "kolibri1_1"):
        hf = support_matrix.tiny_model(t)
        with torch.no_grad():
            out = hf(torch.randint(0, 100, (1, 5)), use_cache=False)
        assert torch.isfinite(out.logits).all()


def test_capture_error_names_control_flow_on_tensor_values():
    """A forward that loops over a tensor's values (kolibri1_1's indexer: for start in
    mask.unique().tolist()) cannot be exported; the reason names the model's line."""
    from fxlens.frontend.decoder import _first_line

    class Loop(torch.nn.Module):
        def forward(self, x):
            out = x
            for v in x.unique().tolist():
                out = out + v
            return out
    with pytest.raises(Exception) as err:
        torch.export.export(Loop(), (torch.tensor([1, 2, 2]),), strict=False)
    reason = _first_line(err.value)
    assert "control flow on tensor values at test_support.py:" in reason
    assert "for v in x.unique().tolist():" in reason


def test_a_block_the_forward_skips_is_an_empty_block():
    """Mllama on text alone skips its cross-attention layers (layer 1 of the tiny
    model): no node of model.layers.1 is in the graph, between two blocks that ran.
    Block 1 is kept, empty: hook_resid_pre and hook_resid_post are the stream block
    0 returned, the hooks chain in order (an edit at blocks.1.hook_resid_pre reaches
    blocks.2), and generation uses the KV cache of the attention blocks."""
    from fxlens.runtime.generate import KVCacheWarning
    import warnings
    hf = support_matrix.tiny_model("mllama")
    ids = torch.randint(0, 500, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
    model = fxlens.from_pretrained_no_processing(hf, self_check=False)
    assert model.cfg.n_layers == 3
    assert [(lc.token_mixer, lc.has_mlp) for lc in model.cfg.layers] == [("attn", True), ("none", False),
                                                                       ("attn", True)]
    logits, cache = model.run_with_cache(ids)
    assert support_matrix.rel_err(logits, want) <= 1e-4      # float32 rounding
    assert torch.equal(cache["blocks.1.hook_resid_pre"], cache["blocks.0.hook_resid_post"])
    assert torch.equal(cache["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_pre"])
    shift = torch.randn(64, generator=torch.Generator().manual_seed(7))
    seen = {}
    model.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: x + shift),
                                         ("blocks.2.hook_resid_pre", lambda x, hook: seen.setdefault("x", x))])
    torch.testing.assert_close(seen["x"], cache["blocks.2.hook_resid_pre"] + shift)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KVCacheWarning)
        cached = model.generate(ids[:1], max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
    full = model.generate(ids[:1], max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False,
                          use_past_kv_cache=False)
    assert torch.equal(cached, full)


def test_cat_with_an_empty_operand_leaves_a_viewable_tensor():
    """GPT-NeoX-Japanese's rotary concatenates a permuted q/k with an empty
    pass-through part (rotary_pct = 1) and then views the result. Dropping the empty
    operand must keep the cat's fresh contiguous output, or the view fails at capture
    (the type refused after the empty-cat rewrite landed for XLM, until this fix)."""
    row = support_matrix.check_type("gpt_neox_japanese")
    assert row["status"] == "pass", row["reason"]
    assert row["processed"] == "pass", row["processed_reason"]
