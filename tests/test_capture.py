"""Capture from each kind of source: a folder, a hub id in the local HF cache, a model object."""

import shutil

import pytest
import torch

import fxlens
from conftest import DATA, hf_model


def _fake_hub_cache(root, repo: str, src) -> None:
    """The layout huggingface_hub uses for a downloaded repo: refs/main -> snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(src, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


def test_hub_id_from_the_local_cache(tmp_path):
    _fake_hub_cache(tmp_path, "fxlens-test/tiny-gpt2", DATA / "models" / "gpt2")
    model = fxlens.from_pretrained_no_processing("fxlens-test/tiny-gpt2", cache_dir=str(tmp_path))
    tokens = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        want = hf_model("gpt2")(tokens).logits
    assert (model(tokens) - want).abs().max() <= 1e-4 * want.abs().max()  # float32 rounding
    assert model.tokenizer is not None  # the tokenizer came from the cache too


def test_hub_id_not_in_the_cache_fails_fast_without_network(tmp_path):
    with pytest.raises(fxlens.CaptureError, match="local HF cache"):
        fxlens.from_pretrained_no_processing("fxlens-test/not-there", cache_dir=str(tmp_path))


def test_in_memory_model_and_a_folder_give_the_same_graph():
    from_folder = fxlens.from_pretrained_no_processing(DATA / "models" / "llama")
    from_object = fxlens.from_pretrained_no_processing(hf_model("llama"))
    tokens = torch.tensor([[1, 5, 9, 200, 17]])
    assert torch.equal(from_folder(tokens), from_object(tokens))
    assert from_folder.hook_names == from_object.hook_names
    assert from_object.tokenizer is not None  # found beside the weights (name_or_path)


def test_n_ctx_is_read_from_every_field_name_or_the_default_is_said():
    import warnings
    from transformers import MptConfig, PretrainedConfig

    from fxlens.frontend.decoder import n_ctx_of

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert n_ctx_of(MptConfig(max_seq_len=128)) == 128     # MPT's name for it
    with pytest.warns(UserWarning, match="names no context length.*assumes n_ctx=2048"):
        assert n_ctx_of(PretrainedConfig()) == 2048


def test_models_counting_positions_from_padding_idx_keep_their_own_positions():
    """RoBERTa counts positions from padding_idx + 1; mask-derived 0-based ids would move them."""
    from transformers import RobertaConfig, RobertaForCausalLM

    import fxlens

    cfg = RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40, is_decoder=True,
                        attn_implementation="eager")
    hf = RobertaForCausalLM(cfg).eval()
    toks = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    model = fxlens.from_pretrained_no_processing(hf, self_check=False)
    with torch.no_grad():
        want = hf(toks).logits
    # float32 through one layer: rounding only (~1e-7); shifted positions move logits by O(1)
    assert (model(toks) - want).abs().max() <= 1e-4 * want.abs().max()


def test_a_write_through_a_view_is_kept():
    """In-place writes through views (a forward hook on the embedding that edits
    its output as HF code edits hidden states) are functionalised, not renamed
    away: fxlens's logits and block 0's input equal the eager model's."""
    from tiny_models import D_HEAD, N_HEADS, tiny_model

    from fxlens.frontend.compat import mutates

    hf = tiny_model("gpt2")

    def edit(module, args, out):              # out [batch, pos, d_model]
        b, s, _ = out.shape
        out.view(b, s, N_HEADS, D_HEAD)[..., : D_HEAD // 2].mul_(3.0)   # through a view
        out[:, 0] += 1.0                                                # through a select

    hf.transformer.wte.register_forward_hook(edit)
    model = fxlens.from_pretrained_no_processing(hf)   # the load-time self-check passes too
    assert not any(mutates(n) for n in model.graph_module.graph.nodes)
    tokens = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
        logits, cache = model.run_with_cache(tokens)
    assert (logits - out.logits).abs().max() <= 1e-4 * out.logits.abs().max()   # float32 rounding
    resid = cache["blocks.0.hook_resid_pre"]
    want = out.hidden_states[0]
    assert (resid - want).abs().max() <= 1e-5 * want.abs().max()   # the same adds, float32 rounding


def test_a_private_in_place_write_becomes_its_out_of_place_op(monkeypatch):
    """An in-place op on a fresh value nothing else reads (Gemma 4's `h *= layer_scalar`,
    GPT-Neo's `detach_`) is replaced by its out-of-place op, without the retrace
    of `run_decompositions` (most of such a capture's time); a write through a view
    still takes the retrace. Either way the graph has no in-place op and gives HF's logits."""
    from tiny_models import tiny_model

    from fxlens.frontend.compat import mutates

    retraced = []
    real = torch.export.ExportedProgram.run_decompositions
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions",
                        lambda self, *a, **k: retraced.append(1) or real(self, *a, **k))

    def private(module, args, out):
        h = out + 0.5
        h.mul_(2.0)                 # h: made here, read by nothing else
        return h

    def through_view(module, args, out):
        out[:, 0] += 1.0            # a write through a select of `out`

    for edit, retrace in ((private, False), (through_view, True)):
        hf = tiny_model("gpt2")
        hf.transformer.wte.register_forward_hook(edit)
        retraced.clear()
        model = fxlens.from_pretrained_no_processing(hf, self_check=False)
        assert bool(retraced) is retrace
        assert not any(mutates(n) for n in model.graph_module.graph.nodes)
        tokens = torch.tensor([[1, 40, 41, 42, 43]])
        with torch.no_grad():
            want = hf(tokens).logits
        assert (model(tokens) - want).abs().max() <= 1e-4 * want.abs().max()   # float32 rounding
