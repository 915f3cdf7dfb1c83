"""Encoders: TransformerLens HookedEncoder names and numbers on a tiny BERT
(tests/data/ref/bert), and the real all-MiniLM-L6-v2 as a sentence embedder."""

import functools

import pytest
import torch

import fxlens
from conftest import DATA, RTOL, oracle, oracle_hooks, rel_err

# RTOL (1e-4 of each tensor's largest magnitude): TransformerLens's HookedEncoder
# agrees with HF BERT to ~1e-5 on these weights (hooks.json: 9.5e-6 on the
# logits), and exposing LayerNorm as explicit ops moves float32 values by ~1e-6;
# a misplaced site (resid_post before/after ln2, the wrong norm) is off by O(1).


@functools.lru_cache(maxsize=None)
def captured_bert():
    return fxlens.capture_encoder(DATA / "models" / "bert")


def bert():
    """A fresh instrumentation (opt-in sites rewrite the graph) of the one capture."""
    return fxlens.encoder_from_pretrained_no_processing(captured_bert())


@functools.lru_cache(maxsize=None)
def bert_model():
    return bert()


def tokens():
    return oracle("bert", "tokens")["tokens"]


def test_hook_names_are_hooked_encoder_names_in_order():
    model = bert_model()
    want = list(oracle_hooks("bert")["hooks"])
    assert model.hook_names == want
    _, cache = model.run_with_cache(tokens())
    assert list(cache.keys()) == want


def test_every_activation_matches_transformerlens():
    model = bert_model()
    shapes = oracle_hooks("bert")["hooks"]
    _, cache = model.run_with_cache(tokens())
    bad = {}
    for name, want in oracle("bert", "raw").items():
        got = cache[name]
        assert list(got.shape) == shapes[name], name
        if not rel_err(got, want) <= RTOL:
            bad[name] = rel_err(got, want)
    assert not bad, bad


def test_mlm_logits_match_transformerlens_and_hf():
    model = bert_model()
    got = model(tokens())
    assert got.shape == (2, 8, 512)
    assert rel_err(got, oracle("bert", "raw_logits")["logits"]) <= RTOL
    with torch.no_grad():
        want = captured_bert().hf_model(tokens()).prediction_logits
    assert rel_err(got, want) <= RTOL


def test_post_ln_residual_stream():
    """The next block reads the normalized residual; the full embedding is block 0's input."""
    _, cache = bert_model().run_with_cache(tokens())
    assert torch.equal(cache["hook_full_embed"], cache["blocks.0.hook_resid_pre"])
    for layer in range(2):
        assert torch.equal(cache[f"blocks.{layer}.hook_normalized_resid_post"],
                           cache[f"blocks.{layer + 1}.hook_resid_pre"])


def test_structure_and_config():
    model = bert_model()
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab) == (3, 64, 4, 16, 256, 512)
    assert (cfg.attention_dir, cfg.normalization_type, cfg.positional_embedding_type) == \
        ("bidirectional", "LN", "standard")
    matched = {r.name: r.matched for r in model.pass_results}
    # norms: embeddings, 2 per block, the MLM head's
    assert matched["expose_norms"] == 1 + 2 * 3 + 1
    assert matched["insert_hooks"] == 64
    assert repr(model).startswith("HookedEncoder(")


def test_attention_mask_and_token_types_match_hf():
    model = bert_model()
    toks = tokens()
    mask = torch.ones_like(toks)
    mask[1, 5:] = 0
    types = torch.zeros_like(toks)
    types[:, 4:] = 1
    with torch.no_grad():
        want = captured_bert().hf_model(toks, attention_mask=mask, token_type_ids=types).prediction_logits
    logits, cache = model.run_with_cache(toks, one_zero_attention_mask=mask, token_type_ids=types)
    assert rel_err(logits, want) <= RTOL
    scores = cache["blocks.0.attn.hook_attn_scores"]
    # padded keys are -inf for every query, like TransformerLens; the rest is finite
    assert torch.isneginf(scores[1, :, :, 5:]).all() and torch.isfinite(scores[0]).all()
    assert (cache["blocks.0.attn.hook_pattern"][1, :, :, 5:] == 0).all()
    # bound for that call only: the next call is unmasked again
    assert rel_err(model(toks), oracle("bert", "raw_logits")["logits"]) <= RTOL


def test_opt_in_sites_have_hooked_encoder_meaning():
    """hook_mlp_in is resid_mid (before ln1); hook_q_input is resid_pre per head (no norm)."""
    model = bert()
    ref = oracle("bert", "raw")
    logits, cache = model.run_with_cache(tokens(), names_filter=["blocks.1.hook_mlp_in", "blocks.0.hook_q_input"])
    assert rel_err(cache["blocks.1.hook_mlp_in"], ref["blocks.1.hook_resid_mid"]) <= RTOL
    q_in = cache["blocks.0.hook_q_input"]
    assert q_in.shape == (2, 8, 4, 64)
    assert rel_err(q_in, ref["blocks.0.hook_resid_pre"][:, :, None].expand_as(q_in)) <= RTOL
    assert rel_err(logits, oracle("bert", "raw_logits")["logits"]) <= RTOL


def test_processing_is_skipped_with_a_warning():
    with pytest.warns(UserWarning, match="processing skipped: .*fold_ln.*encoders load unprocessed"):
        model = fxlens.from_pretrained(captured_bert())
    assert isinstance(model, fxlens.HookedEncoder)
    assert rel_err(model(tokens()), oracle("bert", "raw_logits")["logits"]) <= RTOL


def test_bad_inputs_are_refused():
    model = bert_model()
    with pytest.raises(ValueError, match="token_type_ids has shape"):
        model(tokens(), token_type_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="an encoder returns"):
        model(tokens(), return_type="loss")
    with pytest.raises(ValueError, match="kind='banana'"):
        fxlens.from_pretrained_no_processing(captured_bert(), kind="banana")


# --- other encoders, tiny from configs: found by provenance and dataflow, no table ----------

_TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=128, max_position_embeddings=66, pad_token_id=1)
OTHER_ENCODERS = {
    "roberta": _TINY,                                       # positions computed from input_ids
    "distilbert": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                       max_position_embeddings=64, pad_token_id=0),   # no token types
    "electra": dict(_TINY, embedding_size=64),
}


@pytest.mark.parametrize("model_type", OTHER_ENCODERS)
def test_other_encoders_match_hf(model_type):
    from transformers import AutoConfig, AutoModelForMaskedLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **OTHER_ENCODERS[model_type])
    hf = AutoModelForMaskedLM.from_config(config, attn_implementation="eager").eval()
    model = fxlens.encoder_from_pretrained_no_processing(hf)
    toks = torch.randint(5, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(toks).logits
    assert rel_err(model(toks), want) <= RTOL
    embed = ["embed.hook_embed", "embed.hook_pos_embed", "embed.hook_token_type_embed",
             "embed.ln.hook_scale", "embed.ln.hook_normalized", "hook_full_embed"]
    if model_type == "distilbert":
        embed.remove("embed.hook_token_type_embed")
    assert model.hook_names[:len(embed)] == embed
    assert model.hook_names[-4:] == ["mlm_head.ln.hook_scale", "mlm_head.ln.hook_normalized",
                                     "unembed.hook_in", "unembed.hook_out"]
    assert len(model.hook_names) == len(embed) + 2 * 18 + 4


def test_a_pre_ln_encoder_is_refused_with_the_reason():
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.for_model("modernbert", vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    hf = AutoModelForMaskedLM.from_config(config, attn_implementation="eager").eval()
    with pytest.raises(fxlens.UnmappableModelError, match="skips .*mlp_norm.*post-LN blocks"):
        fxlens.encoder_from_pretrained_no_processing(hf)


# --- the real all-MiniLM-L6-v2 ---------------------------------------------------------

TEXTS = ["The capital of France is Paris.", "A man is eating food.", "Hi"]


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel

    from fxlens.tools.checkpoints import minilm as folder

    hf = AutoModel.from_pretrained(folder(), attn_implementation="eager").eval()
    return fxlens.encoder_from_pretrained_no_processing(folder()), hf


def sentence_embedding(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' pipeline: mask-weighted mean over tokens, then L2 normalise."""
    w = mask[..., None].to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * w).sum(1) / w.sum(1).clamp_min(1e-9), dim=-1)


def test_minilm_sites(minilm):
    model, _ = minilm
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp) == (6, 384, 12, 32, 1536)
    # a BertModel has no MLM head: no mlm_head / unembed sites
    assert len(model.hook_names) == 6 + 6 * 18
    assert model.hook_names[-1] == "blocks.5.hook_normalized_resid_post"
    assert not any(n.startswith(("mlm_head", "unembed")) for n in model.hook_names)
    assert model.to_str_tokens("Hello world") == ["[CLS]", "hello", "world", "[SEP]"]


def test_minilm_pooled_embedding_equals_hf(minilm):
    model, hf = minilm
    tokens, _, mask = model.to_tokens(TEXTS)
    assert (mask == 0).any()                 # padded: the mask matters
    with torch.no_grad():
        want = sentence_embedding(hf(tokens, attention_mask=mask).last_hidden_state, mask)
        got = sentence_embedding(model(TEXTS), mask)
    # float32 through 6 layers; the exposed LayerNorm rounds differently (~1e-7)
    assert rel_err(got, want) <= RTOL
    last, cache = model.run_with_cache(TEXTS, names_filter="blocks.5.hook_normalized_resid_post")
    assert torch.equal(cache["blocks.5.hook_normalized_resid_post"], last)


def test_minilm_hook_edit_changes_the_embedding(minilm):
    model, _ = minilm
    tokens, _, mask = model.to_tokens(TEXTS)
    before = sentence_embedding(model(TEXTS), mask)

    def ablate_head_0(z, hook):
        z = z.clone()
        z[:, :, 0] = 0.0
        return z

    edited = sentence_embedding(model.run_with_hooks(TEXTS, fwd_hooks=[("blocks.3.attn.hook_z", ablate_head_0)]), mask)
    assert (edited - before).abs().max() > 1e-3
    # the hook lived for that call only
    assert torch.equal(sentence_embedding(model(TEXTS), mask), before)


def test_kind_decoder_keeps_the_decoder_path():
    from conftest import captured

    model = fxlens.from_pretrained_no_processing(captured("gpt2"), kind="decoder")
    assert not isinstance(model, fxlens.HookedEncoder)
    assert model.hook_names[0] == "hook_embed"


def test_from_pretrained_on_a_bert_checkpoint_gives_the_encoder():
    """A BERT folder (architectures: BertForPreTraining) through the decoder entry
    point: HookedEncoder sites with bidirectional attention, never a causal BERT."""
    with pytest.warns(UserWarning, match="processing skipped"):
        model = fxlens.from_pretrained(DATA / "models" / "bert")
    assert isinstance(model, fxlens.HookedEncoder)
    assert model.hook_names == list(oracle_hooks("bert")["hooks"])
    assert rel_err(model(tokens()), oracle("bert", "raw_logits")["logits"]) <= RTOL


def test_an_in_memory_masked_lm_gives_the_encoder_and_capture_refuses_it():
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    hf = BertForMaskedLM(cfg).eval()
    model = fxlens.from_pretrained_no_processing(hf)
    assert isinstance(model, fxlens.HookedEncoder)
    toks = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        assert rel_err(model(toks), hf(toks).logits) <= RTOL
    with pytest.raises(fxlens.errors.CaptureError, match="is a BERT-style encoder.*capture_encoder"):
        fxlens.capture(hf)


def test_a_checkpoint_that_is_neither_is_refused_with_the_reason(tmp_path):
    from transformers import T5Config

    T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
             architectures=["T5ForConditionalGeneration"]).save_pretrained(tmp_path)
    with pytest.raises(fxlens.errors.CaptureError,
                       match="neither a causal LM .* nor a BERT-style encoder .*encoder-decoder"):
        fxlens.from_pretrained(tmp_path)


def test_encoder_capture_goes_through_the_decoder_export():
    """One load and one export serve both kinds: the encoder's graph takes the
    mask and token types the forward names, with named dynamic Dims, and no
    mask-derived position ids (BERT keeps its own)."""
    from fxlens.frontend.decoder import POSITIONS

    cap = captured_bert()
    assert cap.info.method == "dims" and cap.info.seq_range == (1, cap.n_ctx)
    inputs = [n.name for n in cap.program.graph.nodes if n.op == "placeholder"
              and n.name in ("input_ids", "attention_mask", "token_type_ids")]
    assert inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert not any(n.meta.get("custom", {}).get(POSITIONS) for n in cap.program.graph.nodes)
