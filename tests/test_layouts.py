"""One TransformerLens layout mapping for eager hooks and compiled variants (issue 19.2).

`Layout.to_tl` is traced into the variant graph (`emit_layout`), so the compiled
variant's cache must equal the eager cache in shape and value for every site of
every architecture. The variant graphs run eagerly here (no compiler): equal
graphs, equal numbers up to the fused attention's blockwise softmax (~1e-6 of a
tensor's size; COMPILED_RTOL = 1e-4 as for the oracle).
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from tiny_models import ARCHS, tiny_model

import fxlens
from fxlens.compiled import COMPILED_RTOL, build_variant

def _check_every_site(model, toks):
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
