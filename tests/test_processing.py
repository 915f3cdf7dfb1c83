"""Weight processing (fold_ln, centring, value-bias folding) as graph passes."""

import functools
import itertools
import re
import sys
import warnings

import pytest
import torch

import fxlens
from conftest import DATA, RTOL, captured, hf_model, oracle, oracle_hooks, rel_err

FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


@functools.lru_cache(maxsize=None)
def processed(arch: str, **flags):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RMS models warn that centring writers is skipped
        return fxlens.from_pretrained(captured(arch), **flags)


def test_processed_activations_match_transformerlens(arch):
    model = processed(arch)
    tokens = oracle(arch, "tokens")["tokens"]
    logits, cache = model.run_with_cache(tokens)
    assert rel_err(logits, oracle(arch, "processed_logits")["logits"]) <= RTOL
    ref = oracle(arch, "processed")
    assert list(cache.keys()) == list(oracle_hooks(arch, "processed")["hooks"])
    bad = {k: rel_err(cache[k], v) for k, v in ref.items() if not rel_err(cache[k], v) <= RTOL}
    assert not bad, bad


def test_processed_opt_in_sites_match_transformerlens(arch):
    model = fxlens.from_pretrained(captured(arch))  # its own: opt-in sites rewrite the graph
    ref = oracle(arch, "processed_extra")
    names = [f"blocks.{i}.{s}" for i in range(model.cfg.n_layers)
             for s in ("attn.hook_result", "hook_mlp_in", "hook_q_input", "hook_k_input", "hook_v_input")]
    _, cache = model.run_with_cache(oracle(arch, "tokens")["tokens"], names_filter=names)
    for name in names:
        assert rel_err(cache[name], ref[name]) <= RTOL, name


ALL_COMBOS = list(itertools.product([False, True], repeat=4))
SINGLES = [tuple(i == j for j in range(4)) for i in range(4)] + [(True,) * 4]


@pytest.mark.parametrize("arch,combo", [("gpt2", c) for c in ALL_COMBOS] +
                         [(a, c) for a in ("gpt_neox", "llama", "opt") for c in SINGLES],
                         ids=lambda x: x if isinstance(x, str) else "".join("1" if f else "0" for f in x))
def test_flag_combinations_keep_hf_log_probs(arch, combo):
    """Every combination on gpt2 (LayerNorm, biases, tied, Conv1D); each flag alone
    and all together on the others."""
    flags = dict(zip(FLAGS, combo))
    model = processed(arch, **flags)
    tokens = oracle(arch, "tokens")["tokens"]
    with torch.no_grad():
        want = hf_model(arch)(tokens).logits.log_softmax(-1)
    # processing changes rounding only (float32): 1e-4 of the largest log-prob
    assert rel_err(model(tokens).log_softmax(-1), want) <= RTOL
    for flag, on in flags.items():
        # a flag that is on was applied unless the model has nothing for it (RMS models: centring writers)
        assert model.processing[flag] == (on and not (flag == "center_writing_weights" and
                                                       model.cfg.normalization_type.startswith("RMS")))


def test_fold_ln_leaves_norms_parameter_free(arch):
    model = processed(arch, fold_ln=True, center_writing_weights=False, center_unembed=False,
                      fold_value_biases=False)
    assert model.cfg.normalization_type in ("LNPre", "RMSPre")
    gm = model.graph_module
    # no parameter is read inside a norm module any more
    for node in gm.graph.nodes:
        if node.op == "call_function" and any("fxlens.norm" in a.meta for a in node.all_input_nodes
                                              if isinstance(a, torch.fx.Node)):
            assert not any(a.op == "get_attr" for a in node.all_input_nodes), node.name


def test_weight_views_reproduce_the_activations(arch):
    """q = normalized @ W_Q + b_Q, attn_out = sum_h z W_O + b_O, ..., logits =
    normalized_final @ W_U + b_U: the views are the weights the graph uses."""
    model = processed(arch)
    cfg = model.cfg
    _, c = model.run_with_cache(oracle(arch, "tokens")["tokens"])
    for L in range(cfg.n_layers):
        x = c[f"blocks.{L}.ln1.hook_normalized"]
        q = torch.einsum("bsm,hmd->bshd", x, model.W_Q[L]) + model.b_Q[L]
        assert rel_err(q, c[f"blocks.{L}.attn.hook_q"]) <= RTOL
        k = torch.einsum("bsm,hmd->bshd", x, model.blocks[L].attn._W_K) + model.blocks[L].attn._b_K
        assert rel_err(k, c[f"blocks.{L}.attn.hook_k"]) <= RTOL
        out = torch.einsum("bshd,hdm->bsm", c[f"blocks.{L}.attn.hook_z"], model.W_O[L]) + model.b_O[L]
        assert rel_err(out, c[f"blocks.{L}.hook_attn_out"]) <= RTOL
        x2 = c[f"blocks.{L}.ln2.hook_normalized"]
        pre_w = model.W_gate[L] if cfg.gated_mlp else model.W_in[L]
        pre_b = 0 if cfg.gated_mlp else model.b_in[L]
        assert rel_err(x2 @ pre_w + pre_b, c[f"blocks.{L}.mlp.hook_pre"]) <= RTOL
        mlp = c[f"blocks.{L}.mlp.hook_post"] @ model.W_out[L] + model.b_out[L]
        assert rel_err(mlp, c[f"blocks.{L}.hook_mlp_out"]) <= RTOL
    logits = c["ln_final.hook_normalized"] @ model.W_U + model.b_U
    assert rel_err(logits, c["unembed.hook_out"]) <= RTOL
    assert model.W_E.shape == (cfg.d_vocab, cfg.d_model)
    assert torch.equal(model.W_K.shape[:2] and model.W_K[:, :1], model.W_K[:, :1])
    assert model.W_K.shape == model.W_Q.shape  # kv heads repeated to all heads, as TransformerLens


def test_factored_matrices(arch):
    model = processed(arch)
    qk = model.blocks[1].attn.QK
    assert torch.allclose(qk.AB, model.W_Q[1] @ model.W_K[1].transpose(-2, -1), atol=1e-5)
    ov = model.OV
    assert ov.shape == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_model)
    # the singular values from the factors equal those of the full product
    full = torch.linalg.svdvals(ov.AB[0, 0])[: model.cfg.d_head]
    assert torch.allclose(ov[0, 0].S, full, rtol=1e-4, atol=1e-5)


def test_gpt2_tied_embedding_is_not_changed_by_folding_into_the_unembedding():
    model = processed("gpt2", fold_ln=True, center_writing_weights=False, center_unembed=False,
                      fold_value_biases=False)
    hf = hf_model("gpt2")
    assert torch.equal(model.W_E, hf.transformer.wte.weight)          # embedding untouched
    ln_f = hf.transformer.ln_f.weight
    want = (hf.lm_head.weight * ln_f).T
    want = want - want.mean(0, keepdim=True)                           # centred reading weights
    assert torch.allclose(model.W_U, want, atol=1e-6)
    assert hf.lm_head.weight is hf.transformer.wte.weight              # the HF model is untouched too


def test_processing_record_says_which_pass_changed_which_parameter():
    model = processed("gpt2")
    changed = model.processing.changed
    assert changed["transformer.h.0.attn.c_attn.weight"] == ["fold_ln"]
    assert "fold_ln" in changed["transformer.h.0.attn.c_attn.bias"]
    assert "fold_value_biases" in changed["transformer.h.0.attn.c_attn.bias"]
    assert changed["transformer.h.0.attn.c_proj.weight"] == ["center_writing_weights"]
    assert "center_unembed" in next(v for k, v in changed.items() if k.startswith("lm_head"))
    # the annotated graph carries the same facts on its parameter nodes
    nodes = {n.target: n for n in model.graph_module.graph.nodes if n.op == "get_attr"}
    assert nodes["transformer.h.0.attn.c_attn.weight"].meta["fxlens.changed_by"] == ["fold_ln"]


def test_refactor_factored_attn_matrices_keeps_circuits_and_outputs():
    base = processed("gpt2")
    model = processed("gpt2", refactor_factored_attn_matrices=True)
    tokens = oracle("gpt2", "tokens")["tokens"]
    assert rel_err(model(tokens).log_softmax(-1), base(tokens).log_softmax(-1)) <= RTOL
    assert torch.allclose(model.QK.AB, base.QK.AB, atol=1e-4)
    assert torch.allclose(model.OV.AB, base.OV.AB, atol=1e-4)
    w_o = model.W_O[0, 0]                                  # [d_head, d_model], orthonormal rows
    assert torch.allclose(w_o @ w_o.T, torch.eye(w_o.shape[0]), atol=1e-4)
    with pytest.raises(fxlens.ProcessingError, match="rotary"):
        fxlens.from_pretrained(DATA / "models" / "llama", refactor_factored_attn_matrices=True)


def test_bad_processing_input():
    with pytest.raises(TypeError, match="fold_lm"):
        fxlens.from_pretrained(DATA / "models" / "gpt2", fold_lm=True)
    with pytest.warns(UserWarning, match="precision"):
        fxlens.from_pretrained(DATA / "models" / "gpt2", dtype=torch.bfloat16, self_check=False)


# --- every architecture of the generality suite ------------------------------------

from tiny_models import tiny_model  # noqa: E402
from test_generality import ARCHS as TINY_ARCHS  # noqa: E402


@functools.lru_cache(maxsize=None)
def tiny_captured(arch: str):
    model = tiny_model(arch)
    return fxlens.capture(model), model


@pytest.mark.parametrize("combo", SINGLES, ids=lambda c: "".join("1" if f else "0" for f in c))
@pytest.mark.parametrize("tiny", TINY_ARCHS)
def test_processing_keeps_hf_log_probs_on_every_architecture(tiny, combo):
    cap, hf = tiny_captured(tiny)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fxlens.from_pretrained(cap, **dict(zip(FLAGS, combo)))
    tokens = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(tokens, use_cache=False).logits.log_softmax(-1)
    # float32 rounding of the folded weights only: 1e-4 of the largest log-prob
    assert rel_err(model(tokens).log_softmax(-1), want) <= RTOL
    # what could not be applied is said, not silently dropped
    skipped = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(skipped) == len(model.processing.skipped)


def test_post_norms_are_skipped_with_the_reason():
    cap, _ = tiny_captured("gemma2")
    with pytest.warns(UserWarning, match=r"post_attention_layernorm feeds .*not only linears"):
        model = fxlens.from_pretrained(cap)
    # the pre-norms were folded all the same
    assert any("fold_ln" in v for v in model.processing.changed.values())
    assert model.processing["fold_ln"]


# --- bfloat16 / float16, and projections behind value-computing ops (issue 19.5) ---

@pytest.mark.parametrize("arch,dtype", [("llama", torch.bfloat16), ("gpt2", torch.float16)])
def test_processing_in_half_precision_keeps_hf_log_probs_in_that_dtype(arch, dtype):
    """fold_ln keeps the norm's cast back to the model dtype (HF norms compute in
    float32), so the folded graph runs; its log-probs stay within rounding of HF's
    in that dtype: fxlens.self_check_rtol(dtype), 8 eps of the largest log-prob (the
    reason is written at fxlens.LOW_PRECISION_EPS; dropping a norm weight moves them ~30 eps)."""
    hf = tiny_model(arch).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "processing weights in bfloat16 loses precision"
        model = fxlens.from_pretrained(hf, dtype=dtype)
    assert model.processing["fold_ln"] and model.W_Q.dtype == dtype
    tokens = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(tokens, use_cache=False).logits.float().log_softmax(-1)
    assert rel_err(model(tokens).float().log_softmax(-1), want) <= fxlens.self_check_rtol(dtype)
    assert fxlens.self_check_rtol(torch.float32) == RTOL


def test_processing_with_a_gate_between_z_and_o_proj():
    """afmoe gates the attention output (z * sigmoid(gate)) before o_proj: index
    tracing stops at the gate instead of running the graph in float64 (it crashed:
    'double != float'); processing folds what it can and W_O says why it has none."""
    sys.path.insert(0, str(DATA.parent.parent / "scripts"))
    import support_matrix
    hf = support_matrix.tiny_model("afmoe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fxlens.from_pretrained(hf)
    assert model.processing["fold_ln"]
    tokens = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(tokens, use_cache=False).logits.log_softmax(-1)
    assert rel_err(model(tokens).log_softmax(-1), want) <= RTOL
    assert model.blocks[0].W_Q.shape == (model.cfg.n_heads, model.cfg.d_model, model.cfg.d_head)
    with pytest.raises(fxlens.UnmappableModelError, match=r"blocks\.0\.attn\.W_O: mul.*aten\.mul"):
        model.blocks[0].W_O


def test_a_graph_that_fails_to_run_is_a_self_check_error():
    cap, _ = tiny_captured("llama")

    def break_dtype(name, gm, result):   # a pass leaving a float64 weight in a float32 graph
        if name == "fold_ln":
            node = next(n for n in gm.graph.nodes if n.op == "get_attr" and "q_proj" in n.target)
            owner, _, leaf = node.target.rpartition(".")
            mod = gm.get_submodule(owner)
            setattr(mod, leaf, torch.nn.Parameter(getattr(mod, leaf).detach().double()))

    with pytest.raises(fxlens.SelfCheckError, match=r"fails on a probe input .*RuntimeError"):
        fxlens.from_pretrained(cap, on_pass=break_dtype)


@pytest.mark.parametrize("model_type,flag,why", [
    ("gpt_oss", "fold_value_biases", r"fold_value_biases: block 0: the softmax .* attention sink"),
    ("roc_bert", "center_writing_weights", r"center_writing_weights: .*embedding reaches the residual stream "
                                           r"through cat"),
])
def test_a_pass_whose_precondition_fails_skips_with_the_reason(model_type, flag, why):
    """GPT-OSS's attention sinks: softmax over keys + a sink column, the sink then
    dropped, so pattern rows sum to < 1 and b_V @ W_O is not constant (folding it
    moved log-probs by 8.8e-3). RoCBert concatenates its word embedding with shape
    and pronunciation embeddings and mixes them by a linear, so centring W_E does
    not commute (7.2e-4). Each pass now finds that from the dataflow and skips it,
    saying why; self_check=False so the log-probs themselves are compared."""
    sys.path.insert(0, str(DATA.parent.parent / "scripts"))
    import support_matrix
    hf = support_matrix.tiny_model(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fxlens.from_pretrained(hf, self_check=False, **{f: f == flag for f in FLAGS})
    assert any(re.match(why, s) for s in model.processing.skipped), model.processing.skipped
    tokens = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(tokens, use_cache=False).logits.log_softmax(-1)
    assert rel_err(model(tokens).log_softmax(-1), want) <= RTOL   # float32 rounding only
