"""Bad input gets a typed error that says what was wrong and the way out."""

import pytest
import torch

import fxlens
from conftest import DATA, oracle_model


@pytest.fixture(scope="module")
def gpt2():
    return oracle_model("gpt2")


def test_unknown_hook_name_lists_the_closest(gpt2):
    tokens = torch.tensor([[1, 20, 30]])
    with pytest.raises(fxlens.UnknownHookError, match=r"blocks\.1\.attn\.hook_pattern"):
        gpt2.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_patern", lambda x, hook: x)])
    with pytest.raises(fxlens.UnknownHookError, match="closest|Closest"):
        gpt2.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_psot"])
    with pytest.raises(fxlens.UnknownHookError):
        gpt2.add_hook("blocks.7.hook_resid_pre", lambda x, hook: x)
    assert all(not hp.fwd_hooks for hp in gpt2.hook_dict.values())


def test_hook_returning_wrong_shape_or_dtype_names_the_hook(gpt2):
    tokens = torch.tensor([[1, 20, 30]])
    with pytest.raises(fxlens.HookReturnError, match=r"blocks\.0\.hook_resid_mid.*\(1, 3, 64\)"):
        gpt2.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_mid", lambda x, hook: x[:, :2])])
    with pytest.raises(fxlens.HookReturnError, match=r"blocks\.0\.attn\.hook_q.*float64"):
        gpt2.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_q", lambda x, hook: x.double())])
    with pytest.raises(fxlens.HookReturnError, match="returned list"):
        gpt2.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda x, hook: [x])])


def test_tokens_longer_than_context(gpt2):
    tokens = torch.ones(1, gpt2.cfg.n_ctx + 1, dtype=torch.long)
    with pytest.raises(fxlens.ContextLengthError, match="n_ctx=128"):
        gpt2(tokens)
    with pytest.raises(ValueError, match="token ids"):
        gpt2(torch.tensor([[1, 99999]]))


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="fold_lnn"):
        fxlens.from_pretrained_no_processing(DATA / "models" / "gpt2", fold_lnn=True)


def test_not_a_checkpoint():
    with pytest.raises(fxlens.CaptureError, match="cannot load"):
        fxlens.from_pretrained_no_processing(DATA / "no-such-model")


def test_self_check_refuses_a_graph_that_changed_the_numbers():
    def corrupt(name, gm, result):
        if name == "insert_hooks":
            # the graph shares parameters with the HF model: replace, don't edit in place
            ln_f = gm.get_submodule("transformer.ln_f")
            ln_f.weight = torch.nn.Parameter(ln_f.weight.detach() + 1.0)

    with pytest.raises(fxlens.SelfCheckError, match="differ"):
        fxlens.from_pretrained_no_processing(DATA / "models" / "gpt2", on_pass=corrupt)


def test_unmappable_model_names_what_is_missing():
    """A model whose blocks have attention but no MLP cannot be mapped, and the
    error says so instead of returning a partial set of hooks."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()
    for block in model.transformer.h:
        block.mlp = _NoMLP()
    with pytest.raises(fxlens.UnmappableModelError, match="missing an MLP"):
        fxlens.from_pretrained_no_processing(model, self_check=False)


class _NoMLP(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_corrupt_weights_file_names_the_file(tmp_path):
    import shutil

    folder = tmp_path / "gpt2"
    shutil.copytree(DATA / "models" / "gpt2", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])   # a cut-off download
    with pytest.raises(fxlens.CaptureError, match=r"model\.safetensors is corrupt or truncated.*Download"):
        fxlens.from_pretrained_no_processing(folder)


def test_token_tensors_of_the_wrong_shape(gpt2):
    with pytest.raises(fxlens.InputError, match=r"shape \(2, 3, 4\); fxlens takes \[batch, pos\].*reshape"):
        gpt2(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(fxlens.InputError, match=r"\(0, 5\): a batch of no rows"):
        gpt2.run_with_cache(torch.ones(0, 5, dtype=torch.long))
    with pytest.raises(fxlens.InputError, match="no tokens"):
        gpt2(torch.ones(1, 0, dtype=torch.long))


def test_names_filter_matching_nothing_says_so(gpt2):
    tokens = torch.tensor([[1, 20, 30]])
    with pytest.raises(fxlens.InputError, match=r"names_filter matched none of this model's \d+ hook names"):
        gpt2.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_resid_psot"))
    with pytest.raises(fxlens.InputError, match="empty list"):
        gpt2.run_with_cache(tokens, names_filter=[])
