"""Compiled hooked inference: specialisation, attention fusion, the variant
cache, recompilation counts and eager fallback.

Cost: inductor compiles take 15-25 s each on a 2-core CPU, so only two tests
use inductor (gpt2: 4 variants; llama: 1). Dynamo-level behaviour (guards,
recompiles, fallbacks) is the same with the cheap "eager" backend (dynamo
traces the specialised graph with fullgraph=True and runs the traced graph),
which also checks every oracle architecture end to end.

Tolerance: COMPILED_RTOL = 1e-4 of each tensor's largest magnitude. Inductor
reorders float32 reductions and sdpa normalises the softmax blockwise, which
moves values by ~1e-6 of their size; 1e-4 is the oracle tests' tolerance.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from conftest import DATA, ORACLE_ARCHS, captured, oracle_model, rel_err
from tiny_models import tiny_model

import fxlens
from fxlens.runtime.compiled import COMPILED_RTOL, CompileFallbackWarning, build_variant
from fxlens.errors import HookReturnError
from fxlens.passes.specialise import hook_nodes

SDPA = torch.ops.aten.scaled_dot_product_attention.default
SOFTMAX = (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)


def tokens(batch: int, pos: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(7, 250, (batch, pos), generator=torch.Generator().manual_seed(seed))


def count(gm, targets) -> int:
    targets = targets if isinstance(targets, tuple) else (targets,)
    return sum(n.op == "call_function" and n.target in targets for n in gm.graph.nodes)


def eager(model, fn):
    """Run `fn()` with the model's eager graph, then restore its compiled state."""
    runner, model._compiled = model._compiled, None
    try:
        return fn()
    finally:
        model._compiled = runner


def assert_cache_close(got, want, rtol=COMPILED_RTOL):
    assert list(got.keys()) == list(want.keys())
    for k in want.keys():
        assert got[k].shape == want[k].shape, k
        assert rel_err(got[k], want[k]) <= rtol, (k, rel_err(got[k], want[k]))
        # masked scores are -inf in both
        assert torch.equal(torch.isinf(got[k]), torch.isinf(want[k])), k


def fresh(arch: str, **kw):
    """A private model (compiling or materialising opt-in sites mutates it)."""
    return fxlens.from_pretrained_no_processing(DATA / "models" / arch, **kw)


# --- specialisation and fusion, run eagerly (no compiler) ---------------------------
@pytest.mark.parametrize("arch", [*ORACLE_ARCHS, "qwen3", "gemma2"])
def test_specialised_graph_matches_eager(arch):
    model = oracle_model(arch) if arch in ORACLE_ARCHS else \
        fxlens.from_pretrained_no_processing(tiny_model(arch))
    toks = tokens(2, 8)
    n_layers = model.cfg.n_layers
    with torch.no_grad():
        want_logits, want = model.run_with_cache(toks)
        # nothing observed: every hook gone, attention fused (except soft-capped gemma2)
        plain, results = build_variant(model, [], [])
        fuse = results[-1]
        assert not hook_nodes(plain.graph)
        if arch == "gemma2":
            assert fuse.matched == 0 and count(plain, SDPA) == 0
            assert all("soft-capping" in s for s in fuse.skipped)
        else:
            assert fuse.matched == n_layers == count(plain, SDPA)
            assert count(plain, SOFTMAX) == 0
        (logits,) = plain(toks)
        # sdpa normalises blockwise: ~1e-6 relative
        assert rel_err(logits, want_logits) <= COMPILED_RTOL
        # everything cached: extra outputs in TransformerLens layout, explicit attention
        names = list(want.keys())
        full, results = build_variant(model, names, [])
        assert results[-1].matched == 0 and count(full, SOFTMAX) == n_layers
        logits, *values = full(toks)
        assert torch.equal(logits, want_logits)
        for name, v in zip(names, values):
            assert v.shape == want[name].shape, name
            assert torch.equal(v, want[name]), name


def test_specialised_processed_model():
    # fold_ln / centring rewrite the graph before hooks go in; specialisation follows it
    model = fxlens.from_pretrained(DATA / "models" / "llama")
    toks = tokens(2, 8)
    with torch.no_grad():
        want_logits, want = model.run_with_cache(toks)
        plain, (_, fuse) = build_variant(model, [], [])
        assert fuse.matched == model.cfg.n_layers
        assert rel_err(plain(toks)[0], want_logits) <= COMPILED_RTOL
        full, _ = build_variant(model, list(want.keys()), [])
        _, *values = full(toks)
    assert all(torch.equal(v, want[k]) for k, v in zip(want.keys(), values))


def test_specialise_keeps_only_what_is_observed():
    model = oracle_model("gpt2")
    cached = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_pattern", "blocks.2.attn.hook_attn_scores"]
    gm, (spec, fuse) = build_variant(model, cached, {"blocks.0.hook_resid_post"})
    assert set(hook_nodes(gm.graph)) == {"blocks.0.hook_resid_post"}
    assert spec.details == {"cached": 3, "hooked": 1, "removed": len(model.hook_dict) - 1,
                            "contracted": 0, "inlined": 0}
    assert len(gm.graph.output_node().args[0]) == 1 + len(cached)
    # block 0 fuses (z is sdpa's output); blocks 1 and 2 are observed
    assert fuse.matched == 1 and count(gm, SDPA) == 1
    assert fuse.skipped == ("blocks.1: blocks.1.attn.hook_pattern is observed (cached)",
                            "blocks.2: blocks.2.attn.hook_attn_scores is observed (cached)")


def test_unobserved_hook_result_costs_nothing():
    model = fresh("gpt2")
    toks = tokens(2, 8)
    with torch.no_grad():
        want_logits, want = model.run_with_cache(toks, names_filter="blocks.1.attn.hook_result")
        # block 1's hook_result is materialised now; a variant that does not observe
        # it contracts the per-head product back into one [b, s, d_model] einsum
        gm, (spec, _) = build_variant(model, [], [])
        assert spec.details["contracted"] == 1
        assert rel_err(gm(toks)[0], want_logits) <= COMPILED_RTOL
        gm, (spec, _) = build_variant(model, ["blocks.1.attn.hook_result"], [])
        assert spec.details["contracted"] == 0
        logits, result = gm(toks)
    assert rel_err(result, want["blocks.1.attn.hook_result"]) <= COMPILED_RTOL


def test_hooked_pattern_keeps_explicit_attention():
    model = oracle_model("llama")
    gm, (_, fuse) = build_variant(model, [], {"blocks.1.attn.hook_pattern"})
    assert fuse.matched == model.cfg.n_layers - 1
    assert len(fuse.skipped) == 1 and fuse.skipped[0].startswith("blocks.1: pattern@V reads")


# --- compiled == eager on every oracle architecture (dynamo only: cheap) --------------
@pytest.mark.parametrize("arch", ORACLE_ARCHS)
def test_compiled_matches_eager(arch):
    model = fresh(arch, compile=True).compile(backend="eager")
    toks = tokens(2, 8)
    with torch.no_grad():
        want_logits, want = eager(model, lambda: model.run_with_cache(toks))
        assert rel_err(model(toks), want_logits) <= COMPILED_RTOL
        logits, cache = model.run_with_cache(toks)
    assert rel_err(logits, want_logits) <= COMPILED_RTOL
    assert_cache_close(cache, want)
    assert model.compile_stats()["compilations"] == 2


# --- inductor -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_inductor():
    return fresh("gpt2").compile()


def test_inductor_forward_and_cache(gpt2_inductor):
    model = gpt2_inductor
    with torch.no_grad():
        for i, (b, s) in enumerate([(2, 7), (3, 11), (4, 16)]):
            toks = tokens(b, s, seed=i)
            want = eager(model, lambda: model(toks))
            assert rel_err(model(toks), want) <= COMPILED_RTOL
        assert model.compile_stats()["compilations"] == 1      # new shapes reuse the graph
        for i, (b, s) in enumerate([(2, 9), (3, 5)]):
            toks = tokens(b, s, seed=10 + i)
            want_logits, want = eager(model, lambda: model.run_with_cache(toks))
            logits, cache = model.run_with_cache(toks)
            assert rel_err(logits, want_logits) <= COMPILED_RTOL
            assert_cache_close(cache, want)
        model(tokens(2, 6))                                     # back to the plain variant
    stats = model.compile_stats()
    assert stats["compilations"] == 2 and stats["variants"] == 2 and stats["fallbacks"] == 0


def test_inductor_editing_hook_and_opt_in(gpt2_inductor):
    model = gpt2_inductor
    before = model.compile_stats()["compilations"]

    def ablate_head(z, hook):                                   # [batch, pos, head, d_head]
        z[:, :, 1] = 0.0
        return z

    hooks = [("blocks.1.attn.hook_z", ablate_head)]
    with torch.no_grad():
        for i, (b, s) in enumerate([(2, 7), (3, 12)]):
            toks = tokens(b, s, seed=20 + i)
            want = eager(model, lambda: model.run_with_hooks(toks, fwd_hooks=hooks))
            assert rel_err(model.run_with_hooks(toks, fwd_hooks=hooks), want) <= COMPILED_RTOL
        # hooks run between inductor-compiled segments: the embedding, one segment for
        # blocks 0 and 2, block 1 before and after z, the unembedding
        assert model.compile_stats()["compilations"] == before + 5
        other = [("blocks.1.attn.hook_z", lambda z, hook: z.index_fill(2, torch.tensor([3]), 0.0))]
        want = eager(model, lambda: model.run_with_hooks(toks, fwd_hooks=other))
        assert rel_err(model.run_with_hooks(toks, fwd_hooks=other), want) <= COMPILED_RTOL
        assert model.compile_stats()["compilations"] == before + 5      # a new hook: nothing
        # an opt-in site rewrites the graph: variants of the old graph are dropped
        names = ["blocks.0.attn.hook_result", "blocks.2.attn.hook_result", "blocks.2.hook_resid_post"]
        toks = tokens(2, 8, seed=30)
        want_logits, want = eager(model, lambda: model.run_with_cache(toks, names_filter=names))
        logits, cache = model.run_with_cache(toks, names_filter=names)
        assert model.compile_stats()["variants"] == 1
    assert rel_err(logits, want_logits) <= COMPILED_RTOL
    assert_cache_close(cache, want)
    assert cache["blocks.0.attn.hook_result"].shape == (2, 8, model.cfg.n_heads, model.cfg.d_model)
    assert model.compile_stats()["compilations"] == before + 6


def test_inductor_gqa_rotary():
    model = fresh("llama").compile()
    toks = tokens(3, 9)
    mask = torch.ones_like(toks)
    mask[0, :3] = 0                                             # row 0 left-padded
    with torch.no_grad():
        want = eager(model, lambda: model(toks))
        got = model(toks)
        want_padded = eager(model, lambda: model(toks, attention_mask=mask))
        got_padded = model(toks, attention_mask=mask)
    assert rel_err(got, want) <= COMPILED_RTOL
    assert rel_err(got_padded, want_padded) <= COMPILED_RTOL
    assert model.compile_stats()["fused_attention"] == {"plain": model.cfg.n_layers}
    assert model.compile_stats()["compilations"] == 1           # padded or not: one graph (mask as input)


# --- dynamo behaviour: recompiles, variant cache, fallback ("eager" backend) -----------
@pytest.fixture
def gpt2_dynamo():
    return fresh("gpt2").compile(backend="eager")


@pytest.fixture
def gpt2_traced():
    return fresh("gpt2").compile(backend="eager", hooks="traced")


def test_recompiles_counted(gpt2_dynamo):
    model = gpt2_dynamo
    with torch.no_grad():
        for b, s in [(2, 7), (3, 9), (5, 20), (2, 3)]:
            model(tokens(b, s))
        assert model.compile_stats()["compilations"] == 1
        # size-1 dims are specialised by dynamo: batch 1 compiles once more, then stays
        model(tokens(1, 7))
        model(tokens(1, 12))
        assert model.compile_stats()["compilations"] == 2
        # another hook set is another variant; switching back compiles nothing
        model.run_with_cache(tokens(2, 7), names_filter=lambda n: n.endswith("hook_z"))
        n = model.compile_stats()["compilations"]
        model(tokens(2, 7))
        model.run_with_cache(tokens(3, 5), names_filter=lambda n: n.endswith("hook_z"))
        assert model.compile_stats()["compilations"] == n
        # a hooked site: the variant runs in segments (embedding, the one block all
        # three blocks share, unembedding), each compiled once; fresh lambdas compile nothing
        for scale in range(3):
            model.run_with_hooks(tokens(2, 7), fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x * scale)])
        assert model.compile_stats()["segments"] == 3
        assert model.compile_stats()["compilations"] == n + 3


def test_untraceable_hook_falls_back_once(gpt2_traced):
    # hooks="traced" only: with hooks="python" (the default) hooks run in Python
    # and nothing is traced through them (test_sweep_of_new_hook_functions_compiles_once)
    model = gpt2_traced
    seen = []

    def noisy(x, hook):
        seen.append(float(x.norm().item()))
        print(f"{hook.name}: norm {seen[-1]:.3f}")

    toks = tokens(2, 7)
    with torch.no_grad():
        want = eager(model, lambda: model(toks))
        with pytest.warns(CompileFallbackWarning, match=r"cannot trace hooks .*noisy on "
                                                         r"blocks\.1\.hook_resid_pre.*runs eagerly"):
            got = model.run_with_hooks(toks, fwd_hooks=[("blocks.1.hook_resid_pre", noisy)])
        assert torch.equal(got, want) and len(seen) == 1        # the hook ran once, eagerly
        with warnings.catch_warnings():
            warnings.simplefilter("error")                      # known fallback: no new warning
            model.run_with_hooks(toks, fwd_hooks=[("blocks.1.hook_resid_pre", noisy)])
    assert len(seen) == 2 and model.compile_stats()["fallbacks"] == 1


def test_hook_errors_still_raise(gpt2_dynamo):
    model = gpt2_dynamo
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(HookReturnError, match="a replacement must match it"):
            model.run_with_hooks(tokens(2, 7), fwd_hooks=[("blocks.0.hook_resid_pre",
                                                           lambda x, hook: x[:, :2])])


def test_compile_at_load_and_uncompile():
    model = fresh("opt", compile=True)
    assert model.is_compiled and model.compile_stats()["variants"] == 0
    assert not model.uncompile().is_compiled and model.compile_stats() == {}


# --- sweeps: hooks run as Python between compiled segments (issue 16) ----------------
# Dynamo-level counts with the "eager" backend (the same guards as inductor, no
# codegen). Tolerance: COMPILED_RTOL (see the module docstring); here the only
# numeric difference from the eager model is the fused attention (sdpa's
# blockwise softmax, ~1e-6 of a tensor's size).
def _patch(x, hook, pos, clean_act):
    x[:, pos] = clean_act[:, pos]
    return x


@pytest.fixture(scope="module")
def tiny_sweep():
    """The tiny gpt2 (3 layers; a private instrumentation of the shared capture),
    compiled with hooks="python"; the corrupted input, the patched site, the clean
    run's activation there and the eager patching results."""
    model = fxlens.from_pretrained_no_processing(captured("gpt2"))
    clean, corrupt = tokens(2, 6, seed=1), tokens(2, 6, seed=2)
    site = "blocks.1.hook_resid_pre"
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=site)
        act = cache[site]
        want = [model.run_with_hooks(corrupt, fwd_hooks=[(site, functools.partial(_patch, pos=p, clean_act=act))])
                for p in range(6)]
    return model.compile(backend="eager"), corrupt, site, act, want


def test_sweep_of_new_hook_functions_compiles_once(tiny_sweep):
    model, corrupt, site, act, want = tiny_sweep
    seen = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")            # no fallback: nothing is traced through a hook
        for p in range(6):                        # a new partial per position
            got = model.run_with_hooks(corrupt, fwd_hooks=[(site, functools.partial(_patch, pos=p, clean_act=act))])
            assert rel_err(got, want[p]) <= COMPILED_RTOL, p
            if p == 0:
                first = model.compile_stats()
        for p in range(6):                        # lambdas in a loop; one calls .item() and prints
            hook = (lambda x, hook, p=p: _patch(x, hook, p, act)) if p % 2 else \
                (lambda x, hook, p=p: (seen.append(x[0, p, 0].item()), _patch(x, hook, p, act))[1])
            assert rel_err(model.run_with_hooks(corrupt, fwd_hooks=[(site, hook)]), want[p]) <= COMPILED_RTOL
    stats = model.compile_stats()
    assert first["compilations"] >= 1 and first["variants"] == 1
    # 12 distinct hook functions, 1 variant: nothing compiled after the first call
    assert (stats["compilations"], stats["variants"], stats["fallbacks"]) == (first["compilations"], 1, 0)
    assert len(seen) == 3


def test_only_a_new_site_set_adds_a_variant(tiny_sweep):
    model, corrupt, site, act, want = tiny_sweep
    runner = model._compiled
    with torch.no_grad():
        model.run_with_hooks(corrupt, fwd_hooks=[(site, functools.partial(_patch, pos=0, clean_act=act))])
        base = model.compile_stats()
        # another residual site: one more variant; its cuts fall on block boundaries,
        # where the segments already end, so every segment is reused
        model.run_with_hooks(corrupt, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x * 0.5)])
        s = model.compile_stats()
        assert (s["variants"], s["compilations"]) == (base["variants"] + 1, base["compilations"])
        # a site inside a block cuts it: new segments (block 1 before and after z), once
        heads = [(lambda z, hook, h=h: z.index_fill(2, torch.tensor([h]), 0.0)) for h in range(model.cfg.n_heads)]
        outs = []
        for h, fn in enumerate(heads):
            outs.append(model.run_with_hooks(corrupt, fwd_hooks=[("blocks.1.attn.hook_z", fn)]))
            if h == 0:
                after_z = model.compile_stats()
        assert after_z["variants"] == base["variants"] + 2 and after_z["compilations"] > s["compilations"]
        assert model.compile_stats()["compilations"] == after_z["compilations"]   # 3 more heads: none
        wants = eager(model, lambda: [model.run_with_hooks(corrupt, fwd_hooks=[("blocks.1.attn.hook_z", fn)])
                                      for fn in heads])
        assert all(rel_err(g, w) <= COMPILED_RTOL for g, w in zip(outs, wants))
        assert not torch.allclose(outs[0], outs[1])          # each head's ablation differs
        # back to the first site set, now with run_with_cache: a new predicate that
        # selects the same names is the same variant
        double = [(site, lambda x, hook: x * 2)]
        with model.hooks(fwd_hooks=double):
            for names_filter in (lambda n: n.endswith("hook_resid_post"), lambda name: "resid_post" in name,
                                 [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]):
                _, cache = model.run_with_cache(corrupt, names_filter=names_filter)
        end = model.compile_stats()
    assert end["variants"] == after_z["variants"] + 1
    # resid_post values are segment outputs already: caching them compiles nothing new
    assert end["compilations"] == after_z["compilations"] and end["fallbacks"] == 0
    assert all(seg.compilations == 1 for seg in runner.segments.values())   # each segment once

    def eager_cache():
        with model.hooks(fwd_hooks=double):
            return model.run_with_cache(corrupt, names_filter=lambda n: n.endswith("hook_resid_post"))[1]

    assert_cache_close(cache, eager(model, eager_cache))


def test_the_work_before_the_hook_is_reused_and_never_stale(tiny_sweep):
    """A sweep over positions at one site: the embedding and block 0 (before the hooked
    blocks.1.hook_resid_pre) run once while the tokens and weights stay the same, the
    patch hook's in-place edit never reaches the kept value, and anything that changes
    what the prefix computes -- a weight edited in place, other tokens, the same
    tokens tensor edited, a cached prefix value the caller edits, autograd -- runs it
    again and gives the eager model's numbers (COMPILED_RTOL, as above)."""
    model, corrupt, site, act, want = tiny_sweep
    runner = model._compiled
    model.compile(backend="eager", reuse_prefix=True)          # opt-in (see fxlens.runtime.prefix)
    try:
        _check_prefix_reuse(model, corrupt, site, act, want)
    finally:
        model._compiled = runner


def _check_prefix_reuse(model, corrupt, site, act, want):
    stats = lambda: (model.compile_stats()["prefix_reused"], model.compile_stats()["prefix_run"])  # noqa: E731
    patch = lambda p: [(site, functools.partial(_patch, pos=p, clean_act=act))]  # noqa: E731
    with torch.no_grad():
        model.run_with_hooks(corrupt, fwd_hooks=patch(0))
        reused, run = stats()
        for p in range(6):                  # each call edits the hooked activation in place
            assert rel_err(model.run_with_hooks(corrupt, fwd_hooks=patch(p)), want[p]) <= COMPILED_RTOL, p
        assert stats() == (reused + 6, run)

        def check(tokens, what):
            before = stats()
            got = model.run_with_hooks(tokens, fwd_hooks=patch(2))
            assert stats() == (before[0], before[1] + 1), what          # run again, not reused
            ref = eager(model, lambda: model.run_with_hooks(tokens, fwd_hooks=patch(2)))
            assert rel_err(got, ref) <= COMPILED_RTOL, what
            return got

        name, weight = next((n, w) for n, w in model.named_parameters() if ".0." in n and w.dim() == 2)
        weight.mul_(1.5)                    # block 0 is in the prefix
        try:
            edited = check(corrupt, f"{name} edited in place")
            assert not torch.allclose(edited, want[2])
        finally:
            weight.div_(1.5)
        check(corrupt, f"{name} restored")
        # fxlens's own weight view (a head's W_O zeroed, as TransformerLens users ablate)
        w_o = model.blocks[0].attn.W_O
        saved = w_o[1].clone()
        w_o[1] = 0.0
        try:
            check(corrupt, "blocks.0.attn.W_O[1] zeroed through the weight view")
        finally:
            w_o[1] = saved
        check(corrupt, "W_O restored")
        # autocast changes what the prefix computes: not the last call's
        with torch.autocast("cpu", dtype=torch.bfloat16):
            before = stats()
            model.run_with_hooks(corrupt, fwd_hooks=patch(2))
            assert stats()[1] == before[1] + 1
        check(corrupt, "autocast off again")
        # past the budget nothing is kept: every call runs its prefix
        budget, model._compiled.kept_budget.max_bytes = model._compiled.kept_budget.max_bytes, 0
        try:
            check(tokens(2, 6, seed=4), "no budget")           # runs, keeps nothing
            check(corrupt, "no budget: the last call kept nothing")
            check(corrupt, "no budget: nor did this one")
        finally:
            model._compiled.kept_budget.max_bytes = budget
        mine = corrupt.clone()
        model.run_with_hooks(mine, fwd_hooks=patch(2))
        mine[0, 0] = (mine[0, 0] + 1) % model.cfg.d_vocab    # the caller's tokens tensor, edited
        check(mine, "tokens edited in place")
        check(tokens(2, 6, seed=3), "other tokens")
        # a prefix value the caller gets in its cache is a copy: editing it changes nothing
        early = "blocks.0.hook_resid_post"
        with model.hooks(fwd_hooks=patch(2)):
            _, first = model.run_with_cache(corrupt, names_filter=[early])
            first[early].zero_()
            _, second = model.run_with_cache(corrupt, names_filter=[early])

        def eager_cache():
            with model.hooks(fwd_hooks=patch(2)):
                return model.run_with_cache(corrupt, names_filter=[early])[1]

        assert rel_err(second[early], eager(model, eager_cache)[early]) <= COMPILED_RTOL
    # autograd recording (weights that require grad, grad enabled): never reused
    model.requires_grad_(True)
    try:
        before = stats()
        for _ in range(2):
            model.run_with_hooks(corrupt, return_type="loss", fwd_hooks=patch(1)).backward()
        assert stats() == (before[0], before[1] + 2)
    finally:
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)


def test_traced_hooks_recompile_per_function(tiny_sweep):
    # the contrast (and the mode kept for fixed hook sets): hooks traced into one
    # graph make dynamo guard on each function and the values it closes over
    model, corrupt, site, act, want = tiny_sweep
    runner = model._compiled
    try:
        model.compile(backend="eager", hooks="traced")
        with torch.no_grad():
            for p in range(2):
                got = model.run_with_hooks(corrupt, fwd_hooks=[(site, functools.partial(_patch, pos=p, clean_act=act))])
                assert rel_err(got, want[p]) <= COMPILED_RTOL
        assert model.compile_stats()["compilations"] == 2 and model.compile_stats()["variants"] == 1
    finally:
        model._compiled = runner
