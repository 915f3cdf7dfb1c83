import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fxlens

DATA = Path(__file__).parent / "data"
ORACLE_ARCHS = ["gpt2", "gpt_neox", "llama", "opt"]

# TransformerLens agrees with HF to <= 2e-5 on logits and <= 1e-4 on the
# residual stream (tests/data/ORACLE.md); 1e-4 of each tensor's largest
# magnitude separates float32 rounding from a real mistake (a wrong rotary
# pairing moves llama's logits by 9).
RTOL = 1e-4


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over finite reference entries, relative to max |want|."""
    finite = torch.isfinite(want)
    scale = want[finite].abs().max().clamp_min(1e-12)
    return ((got - want).abs()[finite].max() / scale).item()


@functools.lru_cache(maxsize=None)
def captured(arch: str):
    """Capture (torch.export) once per checkpoint; each instrumentation gets a fresh graph."""
    return fxlens.capture(DATA / "models" / arch)


@functools.lru_cache(maxsize=None)
def oracle_model(arch: str):
    return fxlens.from_pretrained_no_processing(captured(arch))


@functools.lru_cache(maxsize=None)
def hf_model(arch: str):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(DATA / "models" / arch, attn_implementation="eager").eval()


def oracle(arch: str, what: str) -> dict:
    return load_file(DATA / "ref" / arch / f"{what}.safetensors")


def oracle_hooks(arch: str, mode: str = "raw") -> dict:
    return json.loads((DATA / "ref" / arch / "hooks.json").read_text())["modes"][mode]


@functools.lru_cache(maxsize=None)
def smollm2_pair():
    """(fxlens model, HF model) of the real SmolLM2-135M-Instruct, loaded once per test run
    (the GGUF load and capture are the suite's slowest setup); tests must leave it unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fxlens.tools.checkpoints import smollm2

    folder, gguf = smollm2()
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    return fxlens.from_pretrained_no_processing(hf, tokenizer=tok), hf


@pytest.fixture(params=ORACLE_ARCHS)
def arch(request):
    return request.param


def hf_outputs(hf, ids, modules: dict, **kwargs) -> dict:
    """HF's values on `ids`: each named module's output (its first, for a tuple; or its
    input, for a key ending in '<'), the hidden states, logits and (with
    output_attentions=True) attentions."""
    got, handles = {}, []
    for key, mod in modules.items():
        inp = isinstance(key, str) and key.endswith("<")
        handles.append(mod.register_forward_hook(
            lambda m, a, o, key=key, inp=inp: got.__setitem__(
                key, (a[0] if inp else o[0] if isinstance(o, tuple) else o).detach())))
    try:
        with torch.no_grad():
            out = hf(ids, use_cache=False, output_hidden_states=True, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {**got, "hidden": out.hidden_states, "logits": out.logits, "attentions": out.get("attentions")}
