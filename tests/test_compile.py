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

import warnings

import pytest
import torch
from conftest import DATA, ORACLE_ARCHS, oracle_model, rel_err
from tiny_models import tiny_model

import fxlens
from fxlens.compiled import COMPILED_RTOL, CompileFallbackWarning, build_variant
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
        assert model.compile_stats()["compilations"] == before + 1
        # an opt-in site rewrites the graph: variants of the old graph are dropped
        names = ["blocks.0.attn.hook_result", "blocks.2.attn.hook_result", "blocks.2.hook_resid_post"]
        toks = tokens(2, 8, seed=30)
        want_logits, want = eager(model, lambda: model.run_with_cache(toks, names_filter=names))
        logits, cache = model.run_with_cache(toks, names_filter=names)
        assert model.compile_stats()["variants"] == 1
    assert rel_err(logits, want_logits) <= COMPILED_RTOL
    assert_cache_close(cache, want)
    assert cache["blocks.0.attn.hook_result"].shape == (2, 8, model.cfg.n_heads, model.cfg.d_model)
    assert model.compile_stats()["compilations"] == before + 2


def test_inductor_gqa_rotary():
    model = fresh("llama").compile()
    toks = tokens(3, 9)
    with torch.no_grad():
        want = eager(model, lambda: model(toks))
        got = model(toks)
    assert rel_err(got, want) <= COMPILED_RTOL
    assert model.compile_stats()["fused_attention"] == {"plain": model.cfg.n_layers}


# --- dynamo behaviour: recompiles, variant cache, fallback ("eager" backend) -----------
@pytest.fixture
def gpt2_dynamo():
    return fresh("gpt2").compile(backend="eager")


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
        # a fresh lambda with the same code is the same guard: no recompile
        for scale in range(3):
            model.run_with_hooks(tokens(2, 7), fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x * 2)])
        assert model.compile_stats()["compilations"] == n + 1


def test_untraceable_hook_falls_back_once(gpt2_dynamo):
    model = gpt2_dynamo
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
