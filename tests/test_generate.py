"""Generation: greedy equals HF `generate` (tiny oracle models and SmolLM2-135M),
hooks act at every step and leave with their block, seeded sampling, eos per row,
prompts of different lengths, and one compiled graph for every step.

Equality with HF is exact on token ids: greedy decoding takes the argmax of
logits that agree to ~1e-6, and these prompts have no near-ties.
Cost: SmolLM2 (gguf dequantisation + capture) is loaded once, ~30 s.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import captured, hf_model, oracle_model, rel_err, smollm2_pair

import fxlens
from fxlens.runtime import kv_cache
from fxlens.errors import ContextLengthError, FxlensError
from fxlens.runtime.generate import KVCacheWarning, sample_logits



def prompts(batch: int, pos: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(7, 500, (batch, pos), generator=torch.Generator().manual_seed(seed))


def greedy(model, input, n: int, **kw):
    return model.generate(input, max_new_tokens=n, do_sample=False, verbose=False, **kw)


@pytest.fixture(scope="module")
def smol():
    return smollm2_pair()


# --- equality with HF ---------------------------------------------------------------
@pytest.mark.parametrize("kv", [True, False], ids=["kv_cache", "recompute"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_greedy_equals_hf_on_tiny_models(arch, kv):
    model, hf = oracle_model(arch), hf_model(arch)
    ids = prompts(2, 6)
    got = greedy(model, ids, 12, stop_at_eos=False, use_past_kv_cache=kv)
    # eos_token_id=None: HF runs all 12 steps too, as stop_at_eos=False does
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    assert got.shape == (2, 18) and torch.equal(got, want)


def test_greedy_equals_hf_on_smollm2(smol):
    model, hf = smol
    text = "The capital of France is"
    ids = model.to_tokens(text, prepend_bos=False)        # HF's tokenization adds no BOS here
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    got = greedy(model, text, 8, prepend_bos=False, stop_at_eos=False, return_type="tokens")
    assert want.shape == (1, ids.shape[1] + 8) and torch.equal(got, want)
    assert model.to_string(got[0]).startswith(text + " Paris")


# --- hooks ----------------------------------------------------------------------------
def test_steering_hook_changes_text_and_leaves_with_its_block(smol):
    model, _ = smol
    text, site = "The capital of France is", "blocks.20.hook_resid_post"
    london, paris = model.to_single_token(" London"), model.to_single_token(" Paris")
    direction = model.W_E[london] - model.W_E[paris]                  # [d_model]
    direction = 160 * direction / direction.norm()                    # ~ the residual's own size there
    lengths = []

    def steer(resid, hook):                                          # [batch, pos, d_model]
        lengths.append(resid.shape[1])
        return resid + direction                                      # every position, every step

    with model.hooks(fwd_hooks=[(site, steer)]):
        steered = greedy(model, text, 4, prepend_bos=False)
    assert steered.startswith(text + " London")                       # unsteered: " Paris" (test above)
    n = model.to_tokens(text, prepend_bos=False).shape[1]
    # KV cache: the prompt in one pass (prefill), then one new position per step
    assert lengths == [n, 1, 1, 1]
    assert model.hook_dict[site].fwd_hooks == []


def test_hooks_from_a_block_an_argument_or_add_hook_act_alike():
    model, ids, site = oracle_model("llama"), prompts(2, 6), "blocks.1.hook_resid_post"

    def steer(resid, hook):
        return resid + 2.0

    plain = greedy(model, ids, 6, stop_at_eos=False)
    with model.hooks(fwd_hooks=[(site, steer)]):
        steered = greedy(model, ids, 6, stop_at_eos=False)
    assert not torch.equal(steered, plain)
    assert torch.equal(greedy(model, ids, 6, stop_at_eos=False), plain)   # gone with its block
    assert torch.equal(greedy(model, ids, 6, stop_at_eos=False, fwd_hooks=[(site, steer)]), steered)
    assert model.hook_dict[site].fwd_hooks == []                          # gone with its call
    model.add_hook(site, steer)
    try:
        assert torch.equal(greedy(model, ids, 6, stop_at_eos=False), steered)
    finally:
        model.reset_hooks()
    assert torch.equal(greedy(model, ids, 6, stop_at_eos=False), plain)


# --- sampling -----------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model, ids = oracle_model("llama"), prompts(2, 6)

    def sample(seed, **kw):
        torch.manual_seed(seed)
        return model.generate(ids, max_new_tokens=8, stop_at_eos=False, verbose=False, **kw)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    want = greedy(model, ids, 8, stop_at_eos=False)
    assert torch.equal(sample(3, top_k=1), want)
    assert torch.equal(sample(3, top_p=1e-6), want)               # only the most likely token survives
    assert torch.equal(sample(3, temperature=0.0), want)
    assert torch.equal(sample(5, top_k=20, temperature=0.7, freq_penalty=1.0),
                       sample(5, top_k=20, temperature=0.7, freq_penalty=1.0))


def test_sample_logits_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    torch.manual_seed(0)
    assert set(sample_logits(logits, top_k=2).tolist()) == {0, 1}
    # softmax([3,2,1,0]) = [.64, .24, .09, .03]: top_p=0.7 keeps the first two (mass .64 < .7)
    assert set(sample_logits(logits, top_p=0.7).tolist()) == {0, 1}
    assert set(sample_logits(logits, top_p=0.5).tolist()) == {0}
    # a penalty of 10 per occurrence pushes token 0 below the others
    seen = torch.zeros(2000, 1, dtype=torch.long)
    assert 0 not in set(sample_logits(logits, top_k=1, freq_penalty=10.0, tokens=seen).tolist())
    with pytest.raises(ValueError, match="top_k=0"):
        sample_logits(logits, top_k=0)


# --- stopping and batches -------------------------------------------------------------------
def test_stop_at_eos_stops_rows_independently():
    model, ids = oracle_model("llama"), prompts(2, 6)
    free = greedy(model, ids, 10, stop_at_eos=False)[:, 6:]      # [2, 10] what each row says
    # an "eos" that row 0 says at step k and row 1 never says
    k, eos = next((k, int(t)) for k, t in enumerate(free[0])
                  if int(t) not in free[1].tolist() and int(t) not in free[0, :k].tolist())
    got = greedy(model, ids, 10, eos_token_id=eos)[:, 6:]
    assert torch.equal(got[1], free[1])
    assert torch.equal(got[0, : k + 1], free[0, : k + 1]) and (got[0, k + 1:] == eos).all()
    # one row alone stops as soon as it says eos
    alone = greedy(model, ids[:1], 10, eos_token_id=[eos, 9999])
    assert alone.shape == (1, 6 + k + 1) and alone[0, -1] == eos


def test_prompts_of_different_lengths_match_one_by_one():
    model = oracle_model("llama")
    texts = ["t264 t156 t33", "t7 t8 t9 t10 t11 t12", "t40", "t99 t98 t97"]
    alone = [greedy(model, t, 6, stop_at_eos=False) for t in texts]
    assert greedy(model, texts, 6, stop_at_eos=False) == alone
    # tokens: every row is its prompt and its own continuation, padded on the asked side
    pad = model.tokenizer.pad_token_id
    rows = [greedy(model, model.to_tokens(t), 6, stop_at_eos=False)[0] for t in texts]
    for side in ("left", "right"):
        got = greedy(model, texts, 6, stop_at_eos=False, return_type="tokens", padding_side=side)
        assert got.shape == (4, max(len(r) for r in rows))
        for g, r in zip(got, rows):
            fill = g[: len(g) - len(r)] if side == "left" else g[len(r):]
            assert torch.equal(g[len(g) - len(r):] if side == "left" else g[: len(r)], r)
            assert (fill == pad).all()


def test_return_types_and_errors():
    model, ids = oracle_model("llama"), prompts(1, 4)
    assert isinstance(greedy(model, "t264 t156", 3), str)
    assert isinstance(greedy(model, ["t264 t156"], 3), str)      # a batch of one decodes to one string
    assert greedy(model, ids[0], 3).shape == (7,)                 # 1-D tokens in, 1-D out
    assert greedy(model, "t264 t156", 3, return_type="tokens").shape == (1, 6)
    assert greedy(model, ids, 0).shape == (1, 4)
    with pytest.raises(FxlensError, match="embeds"):
        greedy(model, ids, 3, return_type="embeds")
    with pytest.raises(FxlensError, match="embeddings"):
        greedy(model, torch.randn(1, 4, 64), 3)
    with pytest.raises(ContextLengthError, match="max_new_tokens=200"):
        greedy(model, ids, 200)
    with pytest.raises(ValueError, match="return_type"):
        greedy(model, ids, 3, return_type="logits")


def test_progress_bar_and_kv_cache_fallback_said_once(capsys, monkeypatch):
    model, ids = oracle_model("llama"), prompts(1, 4)
    model.generate(ids, max_new_tokens=5, stop_at_eos=False)              # verbose by default
    assert "5/5" in capsys.readouterr().err
    # OPT computes its positions from the mask; the graph does so too (fxlens.capture),
    # and the decode graph shifts those positions: it decodes with the KV cache
    want = hf_model("opt").generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
    opt = fxlens.from_pretrained_no_processing(captured("opt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KVCacheWarning)
        assert torch.equal(greedy(opt, ids, 4, stop_at_eos=False), want)
    assert opt._decoder_cache[1] is not None
    # a decode graph that fails its load check: generate says so once and recomputes
    # the prefix, with HF's numbers all the same
    monkeypatch.setattr(kv_cache, "build_decoder", lambda model: (None, "one-token steps differ"))
    opt = fxlens.from_pretrained_no_processing(captured("opt"))
    with pytest.warns(KVCacheWarning, match="no KV cache for this model .one-token steps differ"):
        got = greedy(opt, ids, 4, stop_at_eos=False)
    assert torch.equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                     # said once, not again
        greedy(opt, ids, 2)


def test_kv_cache_hooks_see_the_prompt_then_one_position_per_step():
    model, ids = oracle_model("gpt2"), prompts(1, 4)
    shapes = []
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda x, hook: shapes.append(tuple(x.shape))),
                                ("blocks.0.hook_resid_post", lambda x, hook: shapes.append(tuple(x.shape)))]):
        greedy(model, ids, 3, stop_at_eos=False)
    # as TransformerLens's use_past_kv_cache=True: the 4-token prompt once, then 2 decode steps
    # (the 3rd token needs no forward), each one query against every key so far
    h, d = model.cfg.n_heads, model.cfg.d_model
    assert shapes == [(1, 4, d), (1, h, 4, 4), (1, 1, d), (1, h, 1, 5), (1, 1, d), (1, h, 1, 6)]


# The prefill graph is a copy of the full graph with extra outputs: the same ATen ops on the
# same inputs, so eagerly its activations are bitwise the full graph's; 1e-5 (10x under the
# oracle tests' 1e-4) leaves room for nothing but float32 rounding, where a shifted position or
# an attended pad moves values by O(1).
PREFILL_RTOL = 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefill_activations_equal_run_with_cache(arch):
    model = oracle_model(arch)
    ids = prompts(2, 7, seed=3)
    first: dict[str, torch.Tensor] = {}

    def keep(x, hook):
        first.setdefault(hook.name, x.clone())     # the prefill is each hook's first call

    greedy(model, ids, 2, stop_at_eos=False, fwd_hooks=[(n, keep) for n in model.hook_names])
    _, cache = model.run_with_cache(ids)
    assert sorted(first) == sorted(cache.keys()) and len(first) == len(model.hook_names)
    for name, want in cache.items():
        got = first[name]
        assert got.shape == want.shape and got.shape[:2] in ((2, 7), (2, model.cfg.n_heads)), name
        assert rel_err(got, want) <= PREFILL_RTOL, name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompts_of_different_lengths_run_as_one_padded_batch(arch):
    model = oracle_model(arch)
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randint(7, 500, (n,), generator=gen) for n in (3, 8, 5)]
    alone = [greedy(model, r[None], 6, stop_at_eos=False)[0] for r in rows]
    ids = torch.stack([torch.cat([torch.zeros(8 - len(r), dtype=torch.long), r]) for r in rows])
    mask = torch.stack([(torch.arange(8) >= 8 - len(r)).long() for r in rows])
    shapes = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: shapes.append(tuple(x.shape[:2])))]):
        out = greedy(model, ids, 6, stop_at_eos=False, attention_mask=mask, padding_side="left")
    # one batch: the left-padded prompts once, then every row one token per step
    assert shapes == [(3, 8)] + [(3, 1)] * 5
    assert out.shape == (3, 14)
    for i, r in enumerate(rows):
        assert torch.equal(out[i, 8 - len(r):], alone[i]), i
        assert (out[i, : 8 - len(r)] == model._pad_id()).all()
    # the recompute path pads likewise, with the same tokens
    plain = greedy(model, ids, 6, stop_at_eos=False, attention_mask=mask, padding_side="left",
                   use_past_kv_cache=False)
    assert torch.equal(plain, out)


# --- compiled -----------------------------------------------------------------------------
def test_compiled_model_generates_with_one_graph():
    # dynamo with the "eager" backend: the same guards and recompiles as inductor, no codegen
    model = fxlens.from_pretrained_no_processing(captured("gpt2")).compile(backend="eager")
    ids = prompts(2, 5)
    want = greedy(oracle_model("gpt2"), ids, 8, stop_at_eos=False)
    # the recompute path runs the compiled forward (the decode graph runs eagerly)
    assert torch.equal(greedy(model, ids, 8, stop_at_eos=False, use_past_kv_cache=False), want)
    assert model.compile_stats()["compilations"] == 1              # 8 sequence lengths, one graph

    def steer(resid, hook):
        return resid + 3.0

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", steer)]):
        greedy(model, ids, 8, stop_at_eos=False, use_past_kv_cache=False)
    # the hook set runs in segments (embedding, one block for all three, unembedding)
    assert model.compile_stats()["compilations"] == 1 + 3


def test_compiled_generation_compiles_prefill_and_decode_once(caplog):
    """Two generations with other prompt lengths and max_new_tokens, then a left-padded
    batch: the prefill and decode graphs are cut into segments at block boundaries and
    compiled on the first generation only (dynamic batch, prompt and cache lengths; the
    mask always given): each graph's embedding, ONE block segment for all three
    layers, and the unembedding (shared by both graphs; compiled once more for the
    decode step's one position, a size dynamo specialises). Each compile is said on
    the fxlens.compile logger. A hook on an attention output then cuts one more segment
    boundary inside block 1 and compiles only the pieces whose code changed; a new hook function
    compiles nothing."""
    model = fxlens.from_pretrained_no_processing(captured("gpt2")).compile(backend="eager")
    eager = oracle_model("gpt2")
    a, b = prompts(2, 5), prompts(2, 9, seed=1)
    rows = [prompts(1, 3, seed=2)[0], prompts(1, 6, seed=3)[0]]
    with caplog.at_level(logging.INFO, logger="fxlens.compile"):
        assert torch.equal(greedy(model, a, 8, stop_at_eos=False), greedy(eager, a, 8, stop_at_eos=False))
        first = model.compile_stats()["compilations"]
        assert first == 6
        seconds = model.compile_stats()["compile_seconds"]
        assert seconds > 0              # the calls that compiled, counted as compiled forwards are
        assert torch.equal(greedy(model, b, 3, stop_at_eos=False), greedy(eager, b, 3, stop_at_eos=False))
        ids = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), rows[0]]), rows[1]])
        mask = torch.stack([(torch.arange(6) >= 3).long(), torch.ones(6, dtype=torch.long)])
        padded = greedy(model, ids, 4, stop_at_eos=False, attention_mask=mask, padding_side="left")
    for i, r in enumerate(rows):
        assert torch.equal(padded[i, 6 - len(r):], greedy(eager, r[None], 4, stop_at_eos=False)[0])
    assert model.compile_stats()["compilations"] == first
    assert model.compile_stats()["compile_seconds"] == seconds   # nothing compiled since
    said = [r.getMessage() for r in caplog.records if r.name == "fxlens.compile"]
    assert len(said) == 2 * first, said
    labels = [re.match(r"fxlens: compiling (\w+ segment \d) of .* \(\d+ graph nodes; backend eager\)", m)
              for m in said[::2]]
    assert all(labels), said
    assert [m.group(1) for m in labels][:3] == ["prefill segment 0", "prefill segment 1", "prefill segment 2"]
    assert all(re.fullmatch(rf"fxlens: compiled {m.group(1)} in \d+\.\d s", done)
               for m, done in zip(labels, said[1::2]))

    def steer(delta):   # along a direction (a constant shift would be cancelled by the next LayerNorm)
        return lambda resid, hook: resid + delta * torch.linspace(-1, 1, resid.shape[-1])

    # hooked inside a block: tokens as the eager model's with the same hook
    with model.hooks(fwd_hooks=[("blocks.1.hook_attn_out", steer(2.0))]), \
            eager.hooks(fwd_hooks=[("blocks.1.hook_attn_out", steer(2.0))]):
        steered = greedy(model, a, 4, stop_at_eos=False)
        assert torch.equal(steered, greedy(eager, a, 4, stop_at_eos=False))
    assert not torch.equal(steered, greedy(eager, a, 4, stop_at_eos=False))     # the hook acted
    hooked = model.compile_stats()["compilations"]
    assert first < hooked
    with model.hooks(fwd_hooks=[("blocks.1.hook_attn_out", steer(-1.0))]):   # a new function
        greedy(model, a, 4, stop_at_eos=False)
    assert model.compile_stats()["compilations"] == hooked


@pytest.mark.parametrize("fuse", [True, False])
def test_compiled_generation_segments_follow_fuse_attention(fuse):
    """The compiled prefill and decode segments fuse each unobserved attention into
    sdpa (the decode graph's over the cached keys too), unless the model was compiled
    with fuse_attention=False; the tokens are the eager model's either way."""
    model = fxlens.from_pretrained_no_processing(captured("gpt2")).compile(backend="eager", fuse_attention=fuse)
    ids = prompts(2, 5)
    assert torch.equal(greedy(model, ids, 4, stop_at_eos=False),
                       greedy(oracle_model("gpt2"), ids, 4, stop_at_eos=False))
    (prefill, decode), = model._kv_decoder()._compiled.values()
    for gm in (prefill, decode):
        sdpa = [n for m in gm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
                if n.target is torch.ops.aten.scaled_dot_product_attention.default]
        assert len(sdpa) == (1 if fuse else 0)     # one block segment serves all three layers


@pytest.mark.parametrize("model_type", ["gemma2", "deepseek_v3"])
def test_compiled_generation_in_segments_equals_eager(model_type):
    """Compiled generation on blocks of two kinds (gemma2: sliding-window and global
    layers, soft-capped scores; deepseek_v3: MLA with a dense then MoE layers), on a
    left-padded batch: the tokens are the eager model's, and a second call compiles
    nothing more."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import support_matrix

    model = fxlens.from_pretrained_no_processing(support_matrix.tiny_model(model_type), self_check=False)
    ids = prompts(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    kw = dict(attention_mask=mask, padding_side="left", stop_at_eos=False)
    want, want_short = greedy(model, ids, 8, **kw), greedy(model, ids[:, 2:], 5, stop_at_eos=False)   # eager
    model.compile(backend="eager")
    assert torch.equal(greedy(model, ids, 8, **kw), want)
    compiled = model.compile_stats()["compilations"]
    assert torch.equal(greedy(model, ids[:, 2:], 5, stop_at_eos=False), want_short)
    assert model.compile_stats()["compilations"] == compiled
