"""Weight views edit the model (issue 19.3): `model.W_O[L][h] = 0`,
`model.blocks[L].attn.W_O.zero_()`, `W_Q[h] = 0` ... are written back to the
graph's parameters, eager and compiled; edits that cannot be stored exactly
raise WeightEditError."""

import pytest
import torch

import fxlens
from fxlens.errors import WeightEditError
from tiny_models import tiny_model

IDS = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
# Same weights, same graph: an edit through W_O and a hook on hook_z compute the
# same sum in the same order up to float32 rounding of the other heads' terms.
ATOL = 1e-5


def _build(arch):
    return fxlens.from_pretrained(tiny_model(arch))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])   # GQA + rotary; fused Conv1D c_attn
def test_ablating_a_head_through_w_o_equals_zeroing_its_z(arch):
    model = _build(arch)
    L, h = 1, 2
    z_name, out_name = f"blocks.{L}.attn.hook_z", f"blocks.{L}.hook_attn_out"
    _, cache = model.run_with_cache(IDS, names_filter=[z_name, out_name])
    w_o = model.blocks[L].attn.W_O.clone()                       # [head, d_head, d_model]

    def zero_head(z, hook):                                      # [batch, pos, head, d_head]
        z = z.clone()
        z[:, :, h] = 0
        return z

    want = model.run_with_hooks(IDS, fwd_hooks=[(z_name, zero_head)])
    model.W_O[L][h] = 0                                          # the stacked view, TransformerLens style
    assert model.blocks[L].attn.W_O[h].abs().max() == 0
    got, after = model.run_with_cache(IDS, names_filter=out_name)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    # by hand: attn_out loses exactly head h's term z_h @ W_O[h]
    head_term = torch.einsum("bpd,dm->bpm", cache[z_name][:, :, h], w_o[h])
    torch.testing.assert_close(after[out_name], cache[out_name] - head_term, rtol=0, atol=ATOL)


def test_zero_and_setitem_on_block_views_edit_q_and_the_mlp():
    model = _build("llama")
    q_name = "blocks.0.attn.hook_q"
    _, before = model.run_with_cache(IDS, names_filter=q_name)
    model.blocks[0].attn.W_Q[1] = 0                              # head 1 of W_Q [head, d_model, d_head]
    _, after = model.run_with_cache(IDS, names_filter=q_name)
    q0, q1 = before[q_name], after[q_name]                       # [batch, pos, head, d_head]
    assert q1[:, :, 1].abs().max() == 0                          # llama has no q bias
    torch.testing.assert_close(q1[:, :, [0, 2, 3]], q0[:, :, [0, 2, 3]], rtol=0, atol=0)
    model.blocks[1].mlp.W_in.zero_()
    model.blocks[1].mlp.W_gate.zero_()
    _, c = model.run_with_cache(IDS, names_filter="blocks.1.hook_mlp_out")
    assert c["blocks.1.hook_mlp_out"].abs().max() == 0           # silu(0) * 0 @ W_out
    model.W_U[:, 5] = 0
    model.W_E[3] = 0
    assert model(IDS)[..., 5].abs().max() == 0 and model.W_E[3].abs().max() == 0


def test_compiled_variants_see_edits():
    model = _build("llama").compile(backend="aot_eager")
    model(IDS)                                                   # a compiled variant exists now
    model.blocks[0].attn.W_O.zero_()
    model.W_in[1, :, :7] = 0
    got = model(IDS)
    assert model.compile_stats()["fallbacks"] == 0
    want = model.uncompile()(IDS)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # compiled vs eager rounding
    _, c = model.run_with_cache(IDS, names_filter="blocks.0.hook_attn_out")
    assert c["blocks.0.hook_attn_out"].abs().max() == 0         # llama's o_proj has no bias


def test_edits_that_cannot_be_stored_raise_and_change_nothing():
    model = _build("llama")                                      # 4 query heads on 2 kv heads
    k_before = model.blocks[0].attn._W_K.clone()
    with pytest.raises(WeightEditError, match=r"blocks\.0\.attn\.W_K: .*attn\._W_K"):
        model.blocks[0].attn.W_K[0] = 1.0                        # head 0 shares kv head 0 with head 1
    assert torch.equal(model.blocks[0].attn._W_K, k_before)
    model.blocks[0].attn.W_K[0:2] = 1.0                          # both copies agree: written
    assert (model.blocks[0].attn._W_K[0] == 1).all() and torch.equal(model.blocks[0].attn._W_K[1], k_before[1])
    with pytest.raises(WeightEditError, match="no bias parameter"):
        model.b_Q[0, 0] = 1.0
    model.b_Q.zero_()                                            # zeros stay zeros: nothing to store


def test_views_are_tensors_and_results_are_plain():
    model = _build("gpt2")
    w = model.W_O
    assert isinstance(w, torch.Tensor) and w.shape == (2, 4, 16, 64)
    assert type(w * 2) is torch.Tensor and type(w.sum()) is torch.Tensor
    assert type(torch.einsum("lhdm,m->lhd", w, torch.ones(64))) is torch.Tensor
