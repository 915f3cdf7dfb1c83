"""Every built model owns its parameters (issue 19.4): models built from one
capture, and the HF model, never share storage; `.to()` of one model changes
no other and keeps `cfg.dtype` / `cfg.device` true."""

import functools

import pytest
import torch

import fxlens
from tiny_models import tiny_model

IDS = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))


@functools.lru_cache(maxsize=None)
def _captured():
    return fxlens.capture(tiny_model("llama"))


def _storages(module) -> set:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}


def test_models_from_one_capture_share_no_storage():
    cap = _captured()
    m1 = fxlens.from_pretrained_no_processing(cap)
    m2 = fxlens.from_pretrained_no_processing(cap)
    assert not _storages(m1) & _storages(m2)
    assert not _storages(m1) & _storages(cap.hf_model)


def test_editing_one_model_changes_no_other():
    cap = _captured()
    m1 = fxlens.from_pretrained_no_processing(cap)
    m2 = fxlens.from_pretrained(cap)
    hf_embed = cap.hf_model.get_input_embeddings().weight.detach().clone()
    before = m2(IDS)
    with torch.no_grad():
        m1.W_E.mul_(0)
    assert m1.W_E.abs().max() == 0
    assert torch.equal(m2(IDS), before)
    assert torch.equal(cap.hf_model.get_input_embeddings().weight, hf_embed)


def test_built_from_an_hf_model_leaves_it_alone():
    hf = tiny_model("gpt2")       # tied embeddings: the tie survives the copy
    model = fxlens.from_pretrained_no_processing(hf)
    want = hf.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        model.W_E.zero_()
    assert torch.equal(hf.get_input_embeddings().weight, want)
    assert model.W_U.abs().max() == 0     # W_U is tied to W_E in gpt2, in the copy too


def test_to_moves_only_this_model_and_keeps_cfg_true():
    cap = _captured()
    m1 = fxlens.from_pretrained_no_processing(cap)
    m2 = fxlens.from_pretrained_no_processing(cap)
    before = m2(IDS)
    # a dtype move is refused (the graph keeps its casts; issue 11.4), and changes nothing
    for move in (lambda m: m.to(torch.float16), lambda m: m.half(), lambda m: m.to(torch.bfloat16)):
        with pytest.raises(fxlens.FxlensError, match=r"from_pretrained\(\.\.\., dtype="):
            move(m1)
    assert m1.cfg.dtype == torch.float32 and m1.W_E.dtype == torch.float32
    assert cap.hf_model.get_input_embeddings().weight.dtype == torch.float32
    assert torch.equal(m2(IDS), before)
    m1.to("cpu")
    assert m1.cfg.device == "cpu" and m1.cfg.dtype == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(fxlens.FxlensError, match="no CUDA device"):
            m1.run_with_cache(IDS, device="cuda")


def test_unexpected_failure_inside_a_pass_is_a_pass_error():
    from fxlens.pipeline import FRONT, Context, run_pipeline

    def broken(gm, ctx):
        raise RuntimeError("expected m1 and m2 to have the same dtype")

    with pytest.raises(fxlens.PassError, match=r"^broken: failed with RuntimeError: expected m1"):
        run_pipeline(_captured().graph_module(), Context(None, None), pipeline=FRONT[:1] + (("broken", broken),))
