"""Backward hooks and gradient caches (TransformerLens's bwd_hooks and incl_bwd).

The reference for every gradient is `torch.autograd.grad` of the same loss with
respect to the activation a forward hook holds on to.
"""

import pytest
import torch

import fxlens
from conftest import captured, oracle
from fxlens.errors import FxlensError

# The same float32 backward pass computed twice (tensor hook vs autograd.grad):
# the values agree to rounding, ~1e-7 relative; 1e-5 leaves room for the
# different summation order of a sliced head.
RTOL = 1e-5
SITES = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out",
         "blocks.0.attn.hook_pattern", "ln_final.hook_normalized"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return fxlens.from_pretrained_no_processing(captured(request.param))


@pytest.fixture(scope="module")
def tokens():
    return oracle("gpt2", "tokens")["tokens"][:, :12]


def _autograd_reference(model, tokens, sites):
    held = {}

    def hold(act, hook):
        held[hook.name] = act
        return None

    loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(s, hold) for s in sites])
    grads = torch.autograd.grad(loss, [held[s] for s in sites])
    return loss.detach(), dict(zip(sites, grads)), {s: held[s].detach() for s in sites}


def _close(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item() <= RTOL


def test_bwd_hooks_receive_autograd_gradient(model, tokens):
    _, want, _ = _autograd_reference(model, tokens, SITES)
    got = {}

    def grab(grad, hook):
        got[hook.name] = grad.detach().clone()

    loss = model.run_with_hooks(tokens, return_type="loss", bwd_hooks=[(s, grab) for s in SITES])
    loss.backward()
    model.zero_grad(set_to_none=True)
    assert set(got) == set(SITES)
    for s in SITES:
        assert got[s].shape == want[s].shape, s
        assert _close(got[s], want[s]), s
    # hooks lived for the call only
    assert not any(hp.bwd_hooks for hp in model.hook_dict.values())


def test_incl_bwd_cache_has_grad_keys_equal_to_autograd(model, tokens):
    loss_ref, want, acts = _autograd_reference(model, tokens, SITES)
    loss, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter=SITES)
    model.zero_grad(set_to_none=True)
    assert torch.allclose(loss.detach(), loss_ref)
    assert list(cache.keys()) == [k for s in model.hook_names if s in SITES for k in (s, s + "_grad")]
    for s in SITES:
        assert _close(cache[s + "_grad"], want[s]), s
        assert torch.equal(cache[s], acts[s]), s


def test_returned_gradient_replaces_it_upstream(model, tokens):
    # every path from block 0 to the loss runs through blocks.1.hook_resid_pre
    zero = lambda grad, hook: torch.zeros_like(grad)
    with model.hooks(bwd_hooks=[("blocks.1.hook_resid_pre", zero)]):
        _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True,
                                        names_filter=["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post"])
    model.zero_grad(set_to_none=True)
    assert cache["blocks.0.hook_resid_pre_grad"].abs().max() == 0
    assert cache["blocks.1.hook_resid_post_grad"].abs().max() > 0


def test_attribution_patching_equals_hand_computation_and_predicts_small_patches(model, tokens):
    """Attribution patching per head at hook_z: grad(clean loss) . (corrupt - clean)."""
    site = "blocks.1.attn.hook_z"
    corrupt_tokens = tokens.flip(-1)
    _, clean = model.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter=site)
    model.zero_grad(set_to_none=True)
    _, corrupt = model.run_with_cache(corrupt_tokens, names_filter=site)
    delta = corrupt[site] - clean[site]                                  # [b, pos, head, d_head]
    attr = (clean[site + "_grad"] * delta).sum(dim=(0, 1, 3))            # [head]

    _, want, _ = _autograd_reference(model, tokens, [site])
    model.zero_grad(set_to_none=True)
    hand = torch.stack([(want[site][:, :, h] * delta[:, :, h]).sum() for h in range(delta.shape[2])])
    assert _close(attr, hand)

    # first-order: patching eps of head h's difference moves the loss by eps * attr[h]
    eps = 1e-3
    h = int(attr.abs().argmax())
    base = model(tokens, return_type="loss").detach()

    def nudge(z, hook):
        z = z.clone()
        z[:, :, h] += eps * delta[:, :, h]
        return z

    moved = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(site, nudge)]).detach()
    # second-order terms are O(eps^2 |delta|^2): 5% of the predicted change bounds them here
    assert abs((moved - base).item() - eps * attr[h].item()) <= 0.05 * abs(eps * attr[h].item())


def test_add_hook_bwd_and_reset(model, tokens):
    seen = []
    model.add_hook("blocks.0.hook_mlp_out", lambda g, hook: seen.append(hook.name), dir="bwd")
    model(tokens, return_type="loss").backward()
    assert seen == ["blocks.0.hook_mlp_out"]
    model.reset_hooks()
    model(tokens, return_type="loss").backward()
    model.zero_grad(set_to_none=True)
    assert seen == ["blocks.0.hook_mlp_out"]
    with pytest.raises(ValueError, match="use 'fwd' or 'bwd'"):
        model.add_hook("blocks.0.hook_mlp_out", lambda g, hook: None, dir="sideways")


def test_incl_bwd_needs_a_scalar_and_plain_cache_stays_gradient_free(model, tokens):
    with pytest.raises(FxlensError, match="needs a scalar: pass return_type='loss'"):
        model.run_with_cache(tokens, incl_bwd=True, names_filter="blocks.0.hook_resid_pre")
    logits, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")
    assert logits.grad_fn is None and not cache["blocks.0.hook_resid_pre"].requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_compiled_backward_equals_eager_and_new_bwd_hooks_compile_nothing(tokens):
    """Backward hooks on a compiled model (hooks='python'): their sites cut the graph and the
    hooks run between compiled segments, so autograd runs through the compiled code."""
    sites = ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"]
    eager = fxlens.from_pretrained_no_processing(captured("llama"))
    _, want = eager.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter=sites)
    eager.zero_grad(set_to_none=True)
    model = fxlens.from_pretrained_no_processing(captured("llama")).compile(backend="eager")
    _, got = model.run_with_cache(tokens, return_type="loss", incl_bwd=True, names_filter=sites)
    assert list(got.keys()) == list(want.keys())
    for k in want.keys():
        # the compiled variant runs unobserved attention fused (SDPA): ~1e-6 apart
        assert _close(got[k], want[k]), k
    first = model.compile_stats()
    assert first["compilations"] > 0 and first["fallbacks"] == 0
    seen = []
    for i in range(4):     # a new function each time, closing over a new value
        fn = lambda grad, hook, i=i: seen.append((i, grad.shape)) or grad * 1.0
        model.run_with_hooks(tokens, return_type="loss", bwd_hooks=[(sites[0], fn)]).backward()
    model.zero_grad(set_to_none=True)
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    after = model.compile_stats()
    assert after["variants"] == first["variants"] + 1        # one new hooked-site set
    assert after["compilations"] - first["compilations"] <= 3   # its segments, compiled once
    model.run_with_hooks(tokens, return_type="loss", bwd_hooks=[(sites[0], lambda g, hook: None)])
    assert model.compile_stats()["compilations"] == after["compilations"]
