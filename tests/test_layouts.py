"""One TransformerLens layout mapping for eager hooks and compiled variants (issue 19.2).

`Layout.to_tl` is traced into the variant graph (`emit_layout`), so the compiled
variant's cache must equal the eager cache in shape and value for every site of
every architecture. The variant graphs run eagerly here (no compiler): equal
graphs, equal numbers up to the fused attention's blockwise softmax (~1e-6 of a
tensor's size; COMPILED_RTOL = 1e-4 as for the oracle).
"""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import rel_err
from tiny_models import ARCHS, tiny_model

import fxlens
from fxlens.runtime.compiled import COMPILED_RTOL, build_variant

def _check_every_site(model, toks):
    # each site fires once per call, with one shape
    calls = collections.defaultdict(list)
    model.run_with_hooks(toks, fwd_hooks=[(n, lambda x, hook: calls[hook.name].append(tuple(x.shape)))
                                          for n in model.hook_names])
    assert {n: len(calls[n]) for n in model.hook_names if len(calls[n]) != 1} == {}, \
        {n: calls[n] for n in model.hook_names if len(calls[n]) != 1}
    with torch.no_grad():
        want_logits, want = model.run_with_cache(toks)
        for segmented in (False, True):
            gm, _ = build_variant(model, list(want), [], segmented=segmented)
            logits, *values = gm(toks)
            assert rel_err(logits, want_logits) <= COMPILED_RTOL
            for name, v in zip(want, values):
                assert v.shape == want[name].shape, (name, tuple(v.shape), tuple(want[name].shape))
                assert rel_err(v, want[name]) <= COMPILED_RTOL, name
                assert torch.equal(torch.isinf(v), torch.isinf(want[name])), name


@pytest.mark.parametrize("arch", ARCHS)
def test_variant_cache_equals_eager_tiny(arch):
    model = fxlens.from_pretrained_no_processing(tiny_model(arch))
    _check_every_site(model, torch.randint(7, 250, (2, 5), generator=torch.Generator().manual_seed(0)))


def test_variant_cache_equals_eager_with_opt_in_sites():
    """Split q input in layer 0 (ln1 still runs for k and v: its hooks stay there,
    [b, s, 1], and the per-head copy's calls go), one attention input in layer 1
    (the shared copy replaces ln1 and carries its hooks, [b, s, head, 1])."""
    model = fxlens.from_pretrained_no_processing(tiny_model("gpt2"))
    toks = torch.randint(7, 250, (2, 5), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(toks, names_filter=["blocks.0.hook_q_input", "blocks.1.hook_attn_in",
                                                        "blocks.0.attn.hook_result", "blocks.1.hook_mlp_in"])
    assert cache["blocks.0.hook_q_input"].shape == (2, 5, 4, 64)
    _, cache = model.run_with_cache(toks, names_filter=lambda n: "ln1.hook_scale" in n)
    assert cache["blocks.0.ln1.hook_scale"].shape == (2, 5, 1)
    assert cache["blocks.1.ln1.hook_scale"].shape == (2, 5, 4, 1)
    _check_every_site(model, toks)
