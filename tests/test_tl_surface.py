"""The rest of TransformerLens's HookedTransformer / HookedRootModule surface
(fxlens/interp/tl_surface.py): every public name exists or is refused with a typed
error, and each method does what TransformerLens's does."""

import copy
import warnings

import pytest
import torch

import fxlens
from conftest import DATA, captured, oracle_model
from fxlens import HookedModel

# One computation done two ways in float32 (graph vs by hand from the same
# weights): differences are rounding, ~1e-6 of the values.
ATOL = 1e-5

# Names TransformerLens has that mean nothing on a captured graph: each raises
# NotApplicableError saying what to use (checked below, with these arguments).
REFUSED = {
    "init_weights": (),
    "load_and_process_state_dict": ({},),
    "fill_missing_keys": ({},),
    "load_sample_training_dataset": (),
    "sample_datapoint": (),
}


@pytest.fixture(scope="module")
def gpt2():
    return oracle_model("gpt2")


@pytest.fixture(scope="module")
def llama():
    return oracle_model("llama")


def fresh(arch: str, processed: bool = False, **flags):
    """A model of its own (the tests below change it). The load-time self-check
    is tested elsewhere; here models are compared with each other."""
    load = fxlens.from_pretrained if processed else fxlens.from_pretrained_no_processing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "processing skipped" for RMS models
        return load(captured(arch), self_check=False, **flags)


def tl_names() -> list[tuple[str, str]]:
    lines = (DATA / "transformerlens_public_names.txt").read_text().splitlines()
    return [tuple(line.split()) for line in lines if line and not line.startswith("#")]


def test_every_transformerlens_name_exists_or_is_refused(gpt2):
    pairs = tl_names()
    names = [name for owner, name in pairs if owner != "ActivationCache"]
    assert len(names) >= 70 and "get_token_position" in names and "cache_some" in names
    missing = [n for n in names if not hasattr(HookedModel, n)]
    missing += [n for owner, n in pairs if owner == "ActivationCache" and not hasattr(fxlens.ActivationCache, n)]
    assert missing == []
    assert set(REFUSED) <= set(names)
    for name, args in REFUSED.items():
        with pytest.raises(fxlens.NotApplicableError, match=rf"^{name}: fxlens .*(model\.|fxlens|HF)"):
            getattr(gpt2, name)(*args)


def test_cache_takes_negative_layers(gpt2):
    _, cache = gpt2.run_with_cache(torch.tensor([[1, 20, 30, 40]]))
    n = gpt2.cfg.n_layers
    assert cache["resid_pre", -1] is cache["resid_pre", n - 1]
    assert cache["pattern", -2] is cache[f"blocks.{n - 2}.attn.hook_pattern"]
    assert cache["scale", -1, "ln1"] is cache[f"blocks.{n - 1}.ln1.hook_scale"]
    assert ("resid_post", -1) in cache and ("resid_post", -n - 1) not in cache
    assert torch.equal(cache.get_neuron_results(-1), cache.get_neuron_results(n - 1))
    assert cache.to("cpu", move_model=True)["resid_pre", -1].device.type == "cpu"
    try:
        with pytest.warns(UserWarning, match="global grad mode is now False"):
            cache.toggle_autodiff(False)
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)


def test_w_gate_is_none_unless_the_mlp_is_gated(gpt2, llama):
    assert gpt2.W_gate is None
    gate = llama.W_gate
    assert gate.shape == (llama.cfg.n_layers, llama.cfg.d_model, llama.cfg.d_mlp)
    assert torch.equal(gate[1], llama.blocks[1].mlp.W_gate)


def test_token_helpers(gpt2):
    assert gpt2.to_single_str_token(9) == "t9"
    with pytest.raises(TypeError, match="one int"):
        gpt2.to_single_str_token("t9")
    text = "t7 t9 t8 t9"
    # positions agree with to_tokens, BOS included by default
    assert gpt2.get_token_position("t9", text) == 2
    assert gpt2.get_token_position(9, text, mode="last") == 4
    assert gpt2.get_token_position("t9", text, prepend_bos=False) == 1
    assert gpt2.get_token_position(torch.tensor(8), gpt2.to_tokens(text)) == 3
    with pytest.raises(ValueError, match="does not occur"):
        gpt2.get_token_position("t10", text)
    with pytest.raises(ValueError, match="one sequence"):
        gpt2.get_token_position(9, torch.ones(2, 3, dtype=torch.long))


def test_set_tokenizer_fills_pad_and_sets_the_padding_side():
    model = fresh("gpt2")
    tok = copy.deepcopy(model.tokenizer)
    tok.pad_token = None
    model.set_tokenizer(tok, default_padding_side="left")
    assert model.tokenizer is tok and tok.pad_token == tok.eos_token and tok.padding_side == "left"
    assert model.to_tokens(["t7", "t7 t8"]).tolist() == [[tok.eos_token_id, 1, 7], [1, 7, 8]]
    with pytest.raises(TypeError, match="transformers tokenizer"):
        model.set_tokenizer("gpt2")


def test_w_e_pos_and_head_labels(gpt2, llama):
    cfg = gpt2.cfg
    assert torch.equal(gpt2.W_E_pos, torch.cat([gpt2.W_E, gpt2.W_pos]))
    assert gpt2.W_E_pos.shape == (cfg.d_vocab + cfg.n_ctx, cfg.d_model)
    with pytest.raises(fxlens.FxlensError, match="W_E_pos: .*rotary.*W_E"):
        llama.W_E_pos
    labels = gpt2.all_head_labels()
    assert len(labels) == cfg.n_layers * cfg.n_heads and labels[:2] == ["L0H0", "L0H1"]
    assert labels[-1] == f"L{cfg.n_layers - 1}H{cfg.n_heads - 1}"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_composition_scores_equal_the_full_matrix_definition(arch):
    """(Checked once against transformer_lens 3.9's all_composition_scores on the
    gpt2 checkpoint: max difference 6e-8 in all three modes.)"""
    model = oracle_model(arch)
    W_Q, W_K, W_V, W_O = (w.detach() for w in (model.W_Q, model.W_K, model.W_V, model.W_O))
    n, h = model.cfg.n_layers, model.cfg.n_heads
    left = W_V @ W_O                                                    # [L, H, d_model, d_model]
    rights = {"Q": W_Q @ W_K.transpose(-2, -1), "K": W_K @ W_Q.transpose(-2, -1), "V": W_V @ W_O}
    later = torch.arange(n)[:, None, None, None] < torch.arange(n)[None, None, :, None]
    for mode, right in rights.items():
        got = model.all_composition_scores(mode)
        assert got.shape == (n, h, n, h)
        # |L R|_F / (|L|_F |R|_F) for every pair of heads, from the full d_model x d_model products
        both = torch.einsum("ahij,bgjk->ahbgik", left, right)
        want = both.norm(dim=(-2, -1)) / left.norm(dim=(-2, -1))[:, :, None, None] / \
            right.norm(dim=(-2, -1))[None, None]
        assert (got[~later.expand_as(got)] == 0).all()
        # float32 products by hand vs float64 from the factors: rounding, ~1e-6 of scores ~0.1
        assert torch.allclose(got[later.expand_as(got)], want[later.expand_as(want)], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="one of"):
        model.all_composition_scores("O")


def test_input_to_embed_and_get_residual(gpt2, llama):
    tokens = torch.tensor([[1, 20, 30, 40, 50]])
    _, cache = gpt2.run_with_cache(tokens)
    residual, toks, shortformer, mask = gpt2.input_to_embed(tokens)
    assert torch.equal(toks, tokens) and shortformer is None and mask is None
    assert torch.allclose(residual, cache["resid_pre", 0], atol=ATOL)
    embed = cache["hook_embed"]
    resid, none = gpt2.get_residual(embed, 0)
    assert none is None and torch.allclose(resid, cache["resid_pre", 0], atol=ATOL)
    W_pos = gpt2.W_pos
    assert torch.allclose(gpt2.get_residual(embed, 2, return_shortformer_pos_embed=False),
                          embed + W_pos[2:7], atol=ATOL)
    # with a mask, positions count unmasked tokens and pads get no position vector
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    want = embed + torch.stack([0 * W_pos[0], 0 * W_pos[0], W_pos[0], W_pos[1], W_pos[2]])
    assert torch.allclose(gpt2.get_residual(embed, attention_mask=mask)[0], want, atol=ATOL)
    # rotary: nothing is added to the embedding
    x = torch.randn(1, 3, llama.cfg.d_model)
    assert torch.equal(llama.get_residual(x, 0)[0], x)
    with pytest.raises(fxlens.NotApplicableError, match="past_kv_cache"):
        gpt2.input_to_embed(tokens, past_kv_cache=object())
    assert gpt2.get_pos_offset(None, 1) == 0


def test_devices(gpt2):
    assert gpt2.cpu() is gpt2 and gpt2.cfg.device == "cpu"
    assert gpt2.move_model_modules_to_device() is gpt2
    if not torch.cuda.is_available():
        with pytest.raises(fxlens.FxlensError, match="no CUDA device"):
            gpt2.cuda()
    if not torch.backends.mps.is_available():
        with pytest.raises(fxlens.FxlensError, match="no MPS device"):
            gpt2.mps()


def test_perma_hooks_contexts_and_hook_checks():
    model = fresh("gpt2")
    tokens = torch.tensor([[1, 20, 30]])
    calls = []

    def count(x, hook):
        hook.ctx["n"] = hook.ctx.get("n", 0) + 1
        calls.append(hook.name)

    model.add_perma_hook("blocks.0.hook_resid_pre", count)
    model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", count)])
    model.reset_hooks(clear_contexts=False)
    model(tokens)
    assert calls == ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.hook_resid_pre"]
    hp = model.hook_dict["blocks.0.hook_resid_pre"]
    assert hp.ctx == {"n": 2}
    model.clear_contexts()
    assert hp.ctx == {}
    model.run_with_hooks(tokens, clear_contexts=True)     # the perma hook counts, then ctx is cleared
    assert hp.ctx == {} and len(calls) == 4
    assert model.to("cpu", print_details=False) is model
    model.remove_all_hook_fns(including_permanent=True)
    model(tokens)
    assert len(calls) == 4 and len(list(model.hook_points())) == len(model.hook_names)
    with pytest.raises(fxlens.NotApplicableError, match="level=None"):
        model.remove_all_hook_fns(level=1)
    with pytest.raises(TypeError, match="blocks.0.hook_resid_pre.*not a function"):
        model.add_hook("blocks.0.hook_resid_pre", "oops")

    # check_hooks_to_add is called for every hook added, as an override point
    checked = []
    model.check_hooks_to_add = lambda hp, name, hook, **kw: checked.append((name, kw.get("dir", "fwd")))
    model.add_hook(lambda n: n.endswith("hook_resid_post"), count)
    with model.hooks(fwd_hooks=[("hook_embed", count)]):
        pass
    assert checked == [(f"blocks.{l}.hook_resid_post", "fwd") for l in range(model.cfg.n_layers)] + \
        [("hook_embed", "fwd")]


def test_caching_hooks(gpt2):
    tokens = torch.tensor([[1, 20, 30, 40]])
    _, want = gpt2.run_with_cache(tokens)
    names = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"]
    cache = gpt2.add_caching_hooks(names)
    assert gpt2.is_caching
    gpt2(tokens)
    gpt2.reset_hooks()
    assert sorted(cache) == sorted(names) and all(torch.equal(cache[n], want[n]) for n in names)
    assert not gpt2.is_caching
    cache.clear()
    gpt2(tokens)
    assert cache == {}

    # pos_slice on the position dim: -2 for the residual stream, -3 for per-head sites
    cache, fwd, bwd = gpt2.get_caching_hooks(names, remove_batch_dim=True, pos_slice=-1)
    assert bwd == [] and [n for n, _ in fwd] == sorted(names, key=gpt2.hook_names.index)
    with gpt2.hooks(fwd_hooks=fwd):
        gpt2(tokens)
    assert torch.equal(cache["blocks.1.hook_resid_post"], want["blocks.1.hook_resid_post"][0, -1])
    assert torch.equal(cache["blocks.0.attn.hook_z"], want["blocks.0.attn.hook_z"][0, -1])
    assert not any(hp.fwd_hooks for hp in gpt2.hook_dict.values())

    # run_with_cache takes the same pos_slice
    _, sliced = gpt2.run_with_cache(tokens, names_filter=names, pos_slice=(1, 3))
    assert torch.equal(sliced["blocks.0.attn.hook_z"], want["blocks.0.attn.hook_z"][:, 1:3])
    assert torch.equal(sliced["blocks.1.hook_resid_post"], want["blocks.1.hook_resid_post"][:, 1:3])
    with pytest.raises(fxlens.NotApplicableError, match="add_caching_hooks"):
        gpt2.run_with_cache(tokens, reset_hooks_end=False)

    # incl_bwd: "<name>_grad" keys, as run_with_cache(incl_bwd=True)
    _, want_grads = gpt2.run_with_cache(tokens, names_filter=names, return_type="loss", incl_bwd=True)
    cache, fwd, bwd = gpt2.get_caching_hooks(names, incl_bwd=True)
    with gpt2.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
        gpt2(tokens, return_type="loss").backward()
    assert sorted(cache) == sorted(want_grads)
    assert all(torch.allclose(cache[k], want_grads[k], atol=ATOL) for k in cache)

    store = {}
    with pytest.warns(DeprecationWarning, match="cache_all"):
        gpt2.cache_all(store)
    gpt2(tokens)
    gpt2.reset_hooks()
    assert sorted(store) == sorted(want) and torch.equal(store["ln_final.hook_scale"], want["ln_final.hook_scale"])
    store = {}
    with pytest.warns(DeprecationWarning, match="cache_some"):
        gpt2.cache_some(store, lambda n: n.endswith("hook_q"))
    gpt2(tokens)
    gpt2.reset_hooks()
    assert list(store) == [f"blocks.{l}.attn.hook_q" for l in range(gpt2.cfg.n_layers)]


def test_opt_in_switches_materialise_their_sites(llama):
    model = fresh("gpt2")
    tokens = torch.tensor([[1, 20, 30]])
    before = model(tokens)
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    n = model.cfg.n_layers
    for short in ("attn.hook_result", "hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in"):
        assert [f"blocks.{l}.{short}" for l in range(n)] == [h for h in model.hook_names if h.endswith(short)]
    assert model.cfg.use_attn_result and model.cfg.use_split_qkv_input and model.cfg.use_hook_mlp_in
    # as in TransformerLens, one input kind per model
    with pytest.raises(fxlens.FxlensError, match="exclude each other"):
        model.set_use_attn_in(True)
    assert not model.cfg.use_attn_in
    # unedited, the new sites leave the numbers as they were (float32 reassociation)
    assert torch.allclose(model(tokens), before, atol=1e-4)
    model.set_use_attn_result(False)
    assert not model.cfg.use_attn_result and "blocks.0.attn.hook_result" in model.hook_names
    with pytest.raises(fxlens.FxlensError, match="set_use_split_qkv_input"):
        llama.set_use_attn_in(True)
    with pytest.raises(fxlens.NotApplicableError, match="repeat_interleave"):
        llama.set_ungroup_grouped_query_attention(True)
    llama.set_ungroup_grouped_query_attention(False)


def _same_model(got, want):
    tokens = torch.tensor([[1, 20, 30, 40, 50], [1, 9, 8, 7, 6]])
    assert got.cfg.normalization_type == want.cfg.normalization_type
    assert got.processing.applied == want.processing.applied
    assert got.hook_names == want.hook_names
    # the activations below cover every weight; these are the ones each pass rewrites
    for w in ("W_E", "W_Q", "W_V", "b_V", "b_O", "W_in", "W_U", "b_U"):
        assert torch.allclose(getattr(got, w), getattr(want, w), atol=ATOL), w
    (l1, c1), (l2, c2) = got.run_with_cache(tokens), want.run_with_cache(tokens)
    assert torch.allclose(l1, l2, atol=ATOL)
    assert all(torch.allclose(c1[k], c2[k], atol=ATOL) for k in c2)


def test_process_weights_equals_loading_processed():
    """RMSNorm, grouped kv heads, gated MLP (llama)."""
    model = fresh("llama")
    seen = []
    model.add_perma_hook("blocks.0.hook_resid_pre", lambda x, hook: seen.append(1))
    with pytest.warns(UserWarning, match="skipped: center_writing_weights"):
        model.process_weights_()
    assert seen == []          # the passes' self-check runs with hooks set aside
    _same_model(model, fresh("llama", processed=True))
    assert len(seen) == 1      # the perma hook is still on its site


def test_processing_methods_one_by_one():
    """LayerNorm with biases, fused qkv (gpt2), each pass as its own method, in
    TransformerLens's order: each step equals loading with those flags
    (refactor_factored_attn_matrices() is the same mechanism with the next pass)."""
    model = fresh("gpt2")
    model.fold_layer_norm()
    _same_model(model, fresh("gpt2", processed=True, fold_ln=True, center_writing_weights=False,
                             center_unembed=False, fold_value_biases=False))
    model.center_writing_weights()
    model.center_unembed()
    model.fold_value_biases()
    _same_model(model, fresh("gpt2", processed=True))
    with pytest.raises(fxlens.NotApplicableError, match=r"model.fold_layer_norm\(\)"):
        model.fold_layer_norm({})


def test_processing_after_opt_in_sites_is_refused():
    model = fresh("gpt2")
    model.set_use_attn_result(True)
    with pytest.raises(fxlens.ProcessingError, match="attn.hook_result.*Process first"):
        model.process_weights_()


def test_from_pretrained_under_transformerlens_names():
    model = HookedModel.from_pretrained_no_processing(captured("gpt2"), dtype="float32", self_check=False)
    assert isinstance(model, HookedModel) and not model.processing["fold_ln"]
    assert HookedModel.from_pretrained(captured("gpt2"), self_check=False).processing["fold_ln"]
    with pytest.raises(fxlens.NotApplicableError, match="revision="):
        HookedModel.from_pretrained("gpt2", checkpoint_index=3)
