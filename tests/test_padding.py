"""Padded batches (issue 11.1): each row of a left- or right-padded batch equals
the same prompt run alone -- logits and every cached site at its real positions
-- on each positional kind the tiny models offer: learned (gpt2), rotary
(llama), ALiBi (falcon with alibi=True); eager and compiled. A model that cannot take a mask
exactly refuses padded input with PaddingError."""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

import fxlens
from fxlens import PaddingError
from fxlens.runtime.generate import KVCacheWarning
from tests.conftest import captured, oracle_model, rel_err
from tests.tiny_models import _perturb, tiny_config, tiny_model

# A padded row runs the same ops on the same values as its solo run, except
# softmax sums over a longer key axis whose extra entries are exp(-3e38) = 0
# and matmuls blocked for another batch: float32 rounding, ~1e-6 of each
# tensor's size. 1e-4 separates that from shifted positions or attended pads,
# which move logits by O(1) (9.7 on a tiny llama, issue 11).
RTOL = 1e-4
N = 7          # the padded length; the short row has 5 tokens. No other size of these models is 5 or 7.


def _rows(vocab: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (5,), generator=gen), torch.randint(3, vocab, (N,), generator=gen)]


def _pad(rows, side: str, pad_id: int = 0):
    """[batch, N] ids and mask, each row padded on `side`."""
    ids, mask = [], []
    for r in rows:
        fill = torch.full((N - len(r),), pad_id)
        ones, zeros = torch.ones(len(r), dtype=torch.long), torch.zeros(N - len(r), dtype=torch.long)
        ids.append(torch.cat([fill, r] if side == "left" else [r, fill]))
        mask.append(torch.cat([zeros, ones] if side == "left" else [ones, zeros]))
    return torch.stack(ids), torch.stack(mask)


def _real(t: torch.Tensor, n: int, side: str) -> torch.Tensor:
    """`t` (one row) at the real positions of an n-token row: every axis of length N sliced."""
    at = slice(N - n, None) if side == "left" else slice(0, n)
    return t[tuple(at if size == N else slice(None) for size in t.shape)]


def _assert_rows_match(model, reference, rows, side: str, pad_id: int = 0, names=None):
    """Each row of the padded batch run through `model` equals `reference` on the row
    alone, at the sites `names` (default: every site)."""
    ids, mask = _pad(rows, side, pad_id)
    logits, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=names)
    assert len(cache) == len(names or reference.hook_names)
    for name, value in cache.items():   # pad queries too: no NaN anywhere
        assert not value.isnan().any(), name
    for i, r in enumerate(rows):
        solo_logits, solo = reference.run_with_cache(r[None], names_filter=names)
        got = _real(logits[i], len(r), side)
        assert rel_err(got, solo_logits[0]) <= RTOL, (i, side)
        for name, want in solo.items():
            got = _real(cache[name][i], len(r), side)
            assert got.shape == want[0].shape, name
            # masked entries (-inf) at the same places, the rest equal
            assert torch.equal(torch.isfinite(got), torch.isfinite(want[0])), name
            assert rel_err(got, want[0]) <= RTOL, (name, i, side)
    return cache


@pytest.fixture(scope="module")
def alibi():
    """The tiny falcon with ALiBi (no position embedding, no rotary): HF builds
    the bias from the mask's cumulative sum, so padding moves no key position."""
    cfg = tiny_config("falcon")
    cfg.alibi = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    _perturb(model, False, torch.Generator().manual_seed(1))
    return fxlens.from_pretrained_no_processing(model)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["learned", "rotary", "alibi"])
def test_each_padded_row_equals_its_own_run(kind, side, request):
    model = {"learned": lambda: oracle_model("gpt2"), "rotary": lambda: oracle_model("llama"),
             "alibi": lambda: request.getfixturevalue("alibi")}[kind]()
    cache = _assert_rows_match(model, model, _rows(model.cfg.d_vocab), side)
    scores = cache["blocks.0.attn.hook_attn_scores"][0]          # the short row: [head, query, key]
    pad_key = 0 if side == "left" else N - 1
    # TransformerLens's convention: masked entries (pad keys, future keys) are -inf
    assert torch.isneginf(scores[:, N - 1, pad_key] if side == "left" else scores[:, 4, pad_key]).all()
    assert (cache["blocks.0.attn.hook_pattern"][0][:, :, pad_key][:, 2:5] == 0).all()


def test_texts_are_padded_masked_and_the_loss_skips_pads():
    model = oracle_model("gpt2")
    texts = ["Hello", "Hello there, how are you today?"]
    for side in ("left", "right"):
        tokens = model.to_tokens(texts, padding_side=side)
        short = model.to_tokens(texts[0])
        n = short.shape[-1]
        assert n < tokens.shape[-1]
        real = slice(tokens.shape[-1] - n, None) if side == "left" else slice(0, n)
        assert torch.equal(tokens[0, real], short[0])                 # pads on that side
        logits = model(texts, padding_side=side)
        assert rel_err(logits[0, real], model(short)[0]) <= RTOL
        per_token = model(texts, return_type="loss", loss_per_token=True, padding_side=side)
        solo = model(short, return_type="loss", loss_per_token=True)
        pred = slice(real.start, real.start + n - 1)                   # predictions inside the prompt
        assert rel_err(per_token[0, pred], solo[0]) <= RTOL
        assert (per_token[0, : pred.start] == 0).all() and (per_token[0, pred.stop:] == 0).all()
        loss = model(texts, return_type="loss", padding_side=side)
        mask = torch.ones_like(tokens)
        mask[0] = 0
        mask[0, real] = 1
        assert torch.allclose(loss, model.loss_fn(model(texts, padding_side=side), tokens, mask))


def test_a_hook_returning_minus_inf_scores_gives_no_nan():
    """A hook that hands back TransformerLens's -inf scores: the pad query rows are
    masked throughout, and must not softmax to NaN (which pattern @ V spreads)."""
    model = oracle_model("llama")
    ids, mask = _pad(_rows(model.cfg.d_vocab), "left")
    plain = model(ids, attention_mask=mask)
    hooked = model.run_with_hooks(ids, attention_mask=mask,
                                  fwd_hooks=[("blocks.0.attn.hook_attn_scores", lambda x, hook: x.clone())])
    assert torch.isfinite(hooked).all()
    assert rel_err(hooked, plain) <= RTOL


def test_compiled_padded_batch_equals_each_row_alone():
    """Through dynamo (the "eager" backend, as tests/test_compile.py checks dynamo
    behaviour; the inductor check is test_compile's test_inductor_gqa_rotary):
    the specialised graph with fused attention takes the mask as an input."""
    eager = oracle_model("llama")
    model = fxlens.from_pretrained_no_processing(captured("llama")).compile(backend="eager")
    rows = _rows(eager.cfg.d_vocab)
    # a few sites (each cached site is a graph output to trace): rotary, the masked
    # scores and pattern, the residual after the last block
    names = ["blocks.0.attn.hook_rot_q", "blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern",
             f"blocks.{eager.cfg.n_layers - 1}.hook_resid_post"]
    _assert_rows_match(model, eager, rows, "left", names=names)
    ids, mask = _pad(rows, "right")
    assert rel_err(model(ids, attention_mask=mask)[0, :5], eager(rows[0][None])[0]) <= RTOL
    unpadded = torch.stack([rows[1], rows[1]])
    assert rel_err(model(unpadded), eager(unpadded)) <= RTOL
    stats = model.compile_stats()
    assert stats["fallbacks"] == 0 and stats["fused_attention"]["plain"] == eager.cfg.n_layers
    assert stats["compilations"] == 2     # the cache variant; the plain one, padded or not


def test_generate_with_a_padded_batch_equals_each_row_alone():
    model = oracle_model("llama")
    rows = _rows(model.cfg.d_vocab)
    ids, mask = _pad(rows, "left")
    with warnings.catch_warnings():
        warnings.simplefilter("error", KVCacheWarning)      # the mask input leaves the KV cache usable
        out = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, verbose=False,
                             stop_at_eos=False, padding_side="left")
    for i, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=2, do_sample=False, verbose=False, stop_at_eos=False)
        assert torch.equal(out[i, N - len(r):], alone[0])


class _NoMask(GPT2LMHeadModel):
    """A forward without attention_mask: the graph cannot be given one."""

    def forward(self, input_ids=None, use_cache=None):
        return super().forward(input_ids=input_ids, use_cache=use_cache)


class _NoPositions(GPT2LMHeadModel):
    """A mask but no position_ids: positions count from the first column, padding or not."""

    def forward(self, input_ids=None, attention_mask=None, use_cache=None):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def _subclassed(cls):
    model = cls(tiny_config("gpt2"))
    model.load_state_dict(tiny_model("gpt2").state_dict())
    model.set_attn_implementation("eager")
    return fxlens.from_pretrained_no_processing(model.eval())


def test_a_model_that_cannot_mask_refuses_padding():
    model = _subclassed(_NoMask)
    ids, mask = _pad(_rows(model.cfg.d_vocab), "right")
    with pytest.raises(PaddingError, match=r"right-padded batch exactly: its HF forward takes no "
                                           r"attention_mask.*Run the rows separately"):
        model(ids, attention_mask=mask)
    assert model(ids, attention_mask=torch.ones_like(mask)).shape[:2] == ids.shape   # no padding: fine


def test_positions_not_taken_from_the_mask_refuse_left_padding():
    model = _subclassed(_NoPositions)
    rows = _rows(model.cfg.d_vocab)
    ids, mask = _pad(rows, "left")
    with pytest.raises(PaddingError, match=r"left-padded batch exactly: on a left-padded probe the real "
                                           r"positions' logits differ .* or pad on the right"):
        model.run_with_cache(ids, attention_mask=mask)
    _assert_rows_match(model, model, rows, "right")            # right padding keeps positions: exact


def test_generate_where_left_padding_is_refused_runs_rows_apart():
    """Prompts of different lengths on a model whose positions ignore the mask: generate
    does not pad them into one batch (that would shift the short row's positions); rows
    of equal length run together, each row exactly its solo generation."""
    model = _subclassed(_NoPositions)
    assert model.padding_support("left") != ""
    rows = _rows(model.cfg.d_vocab)
    ids, mask = _pad(rows, "left")
    batches = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: batches.append(tuple(x.shape[:2])))]):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, verbose=False,
                             stop_at_eos=False, padding_side="left")
    assert (1, 5) in batches and (1, N) in batches and all(b == 1 for b, _ in batches)   # never padded
    for i, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=3, do_sample=False, verbose=False, stop_at_eos=False)
        assert torch.equal(out[i, N - len(r):], alone[0])
    with pytest.raises(PaddingError):
        model(ids, attention_mask=mask)
