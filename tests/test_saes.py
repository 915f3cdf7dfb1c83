"""SAELens SAEs spliced into a site (fxlens.saes), checked against SAELens itself.

Random-weight SAEs of each architecture are saved with `sae.save_model` and
loaded back with `SAE.load_from_disk` (SAELens's own file format and loader),
then attached to the tiny test models. The reference for every check is
SAELens's code run on the plain model's activation.
"""

import pytest
import torch
from sae_lens import (SAE, GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE,
                      StandardSAEConfig, TopKSAE, TopKSAEConfig)
from sae_lens.saes.sae import SAEMetadata

import fxlens
from fxlens.runtime.compiled import COMPILED_RTOL
from conftest import oracle_model, rel_err

ARCHS = {"standard": (StandardSAE, StandardSAEConfig, {}),
         "topk": (TopKSAE, TopKSAEConfig, {"k": 4}),
         "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
         "gated": (GatedSAE, GatedSAEConfig, {})}
SITE = "blocks.0.hook_resid_post"
D_SAE = 24


def make_sae(tmp_path, kind, site, d_in, seed=0, **cfg):
    """A random-weight SAELens SAE, saved and loaded back by SAELens."""
    cls, cfg_cls, extra = ARCHS[kind]
    sae = cls(cfg_cls(d_in=d_in, d_sae=D_SAE, metadata=SAEMetadata(hook_name=site), **extra, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            # biases and thresholds small, so that about half the features fire
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 2 else 0.05))
        if kind == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.1)
    folder = tmp_path / f"{kind}_{seed}"
    sae.save_model(folder)
    return SAE.load_from_disk(folder)


@pytest.fixture(scope="module")
def model():
    """The shared oracle model: every test leaves it as it found it (no SAE, not compiled)."""
    m = oracle_model("gpt2")
    yield m
    assert not m.acts_to_saes and not m.is_compiled


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(1))


def plain(model, tokens, site=SITE, hook=None):
    """Logits and the site's activation of the model with no SAE, `hook` on the site."""
    assert not model.acts_to_saes
    _, cache = model.run_with_cache(tokens, names_filter=site)
    logits = model.run_with_hooks(tokens, fwd_hooks=[(site, hook)] if hook else [])
    return logits, cache[site]


@pytest.mark.parametrize("kind", list(ARCHS))
def test_splice_matches_sae_lens(model, tokens, tmp_path, kind):
    sae = make_sae(tmp_path, kind, SITE, model.cfg.d_model)
    want_logits, act = plain(model, tokens, hook=lambda x, hook: sae(x))
    model.add_sae(sae)
    try:
        logits, cache = model.run_with_cache(tokens)
    finally:
        model.reset_saes()
    with torch.no_grad():
        feats = sae.encode(act)
    # the same SAELens code on the same float32 values: equal to the bit
    assert torch.equal(cache[f"{SITE}.hook_sae_input"], act)
    assert torch.equal(cache[f"{SITE}.hook_sae_acts_post"], feats)
    assert 0 < (feats > 0).float().mean() < 1          # some features fire, not all
    assert torch.equal(cache[f"{SITE}.hook_sae_recons"], sae.decode(feats).detach())
    assert torch.equal(cache[SITE], cache[f"{SITE}.hook_sae_output"])   # the site: what flows on
    assert f"{SITE}.hook_sae_error" not in cache      # only with use_error_term, as in SAELens
    assert torch.equal(logits, want_logits)
    assert rel_err(logits, plain(model, tokens)[0]) > 1e-2    # the SAE did change the model
    names = list(cache.keys())
    i = names.index(SITE)
    assert names[i + 1:i + 6] == [f"{SITE}.hook_sae_{s}" for s in
                                  ("input", "acts_pre", "acts_post", "recons", "output")]


def test_error_term_and_feature_ablation(model, tokens, tmp_path):
    sae = make_sae(tmp_path, "standard", SITE, model.cfg.d_model)
    base, act = plain(model, tokens)
    with torch.no_grad():
        feats = sae.encode(act)
    j = int((feats > 0).sum((0, 1)).argmax())      # the feature firing at most positions
    with model.saes([sae], use_error_term=True):
        logits, cache = model.run_with_cache(tokens)
        ablated = model.run_with_hooks(tokens, fwd_hooks=[(f"{SITE}.hook_sae_acts_post",
                                                           lambda a, hook: a.index_fill(-1, torch.tensor([j]), 0))])
    # activation - recons + recons: float32 rounding of the two sums only
    assert rel_err(logits, base) < 1e-5
    assert torch.allclose(cache[f"{SITE}.hook_sae_error"], act - sae.decode(feats), atol=1e-6)
    # by hand: the error term holds the clean reconstruction, so zeroing feature j
    # moves the site by exactly -a_j * W_dec[j]
    want = plain(model, tokens, hook=lambda x, hook: x - feats[..., j:j + 1] * sae.W_dec[j])[0]
    assert rel_err(ablated, want) < 1e-5
    assert rel_err(ablated, base) > 1e-3


def test_reset_and_with_block_restore(model, tokens, tmp_path):
    sae1 = make_sae(tmp_path, "standard", SITE, model.cfg.d_model, seed=1)
    sae2 = make_sae(tmp_path, "topk", SITE, model.cfg.d_model, seed=2)
    base = model(tokens)
    n_hooks = len(model.hook_names)
    model.add_sae(sae1)
    with_1 = model(tokens)
    with model.saes([sae2]):
        assert model.acts_to_saes == {SITE: sae2}
        with_2 = model(tokens)
    assert model.acts_to_saes == {SITE: sae1}
    assert torch.equal(model(tokens), with_1)          # sae1 is back after the block
    assert rel_err(with_2, with_1) > 1e-3
    model.reset_saes()
    assert model.acts_to_saes == {} and len(model.hook_names) == n_hooks
    assert torch.equal(model(tokens), base)
    assert not sae1.hook_sae_acts_post._forward_hooks   # the SAE is left as it was


def test_hook_z_sae_on_llama(tmp_path):
    """An SAE on attn.hook_z (SAELens flattens heads): the splice hands it [b, s, h, d_head]."""
    model = oracle_model("llama")
    site = "blocks.1.attn.hook_z"
    d_in = model.cfg.n_heads * model.cfg.d_head
    sae = make_sae(tmp_path, "jumprelu", site, d_in, reshape_activations="hook_z")
    toks = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(3))
    want, z = plain(model, toks, site, hook=lambda x, hook: sae(x))
    with model.saes(sae):
        logits, cache = model.run_with_cache(toks, names_filter=lambda n: n.startswith(site))
    assert torch.equal(cache[f"{site}.hook_sae_acts_post"], sae.encode(z).detach())
    assert torch.equal(logits, want)


def test_compiled_model_runs_the_sae(model, tmp_path, tokens):
    """hooks="python": the SAE and the hooks on its sites run between compiled segments."""
    sae = make_sae(tmp_path, "gated", SITE, model.cfg.d_model)
    names = [f"{SITE}.hook_sae_acts_post", SITE, "blocks.1.hook_resid_post"]
    _, act = plain(model, tokens)
    double = [(f"{SITE}.hook_sae_acts_post", lambda a, hook: a * 2)]   # a feature edit
    with model.saes(sae), model.hooks(fwd_hooks=double):
        want, want_cache = model.run_with_cache(tokens, names_filter=names)
        try:
            model.compile(backend="eager")
            logits, cache = model.run_with_cache(tokens, names_filter=names)
            stats = model.compile_stats()
        finally:
            model.uncompile()
    assert stats["fallbacks"] == 0 and stats["segments"] > 0
    assert rel_err(logits, want) < COMPILED_RTOL
    for name in names:
        assert rel_err(cache[name], want_cache[name]) < COMPILED_RTOL, name
    with torch.no_grad():   # the cache shows the edited features
        assert rel_err(cache[names[0]], 2 * sae.encode(act)) < COMPILED_RTOL


def test_bad_sae_is_a_typed_error(model, tokens, tmp_path):
    with pytest.raises(fxlens.SAEError, match="not a site"):
        model.add_sae(make_sae(tmp_path, "standard", "blocks.0.hook_nothing", model.cfg.d_model))
    with model.saes(make_sae(tmp_path, "standard", SITE, model.cfg.d_model + 1)):
        with pytest.raises(fxlens.SAEError, match="d_in=65"):
            model(tokens)
    assert not model.acts_to_saes
