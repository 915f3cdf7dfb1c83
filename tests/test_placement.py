"""Placed capture: accelerate device maps (CPU + disk offload) and meta-device export.

Only a CPU here: the maps mix "cpu" and "disk" (weights left in the safetensors
file and mapped read-only). A memory limit set with RLIMIT_DATA (which counts a
process's private memory, not read-only file mappings) shows that a checkpoint
larger than the limit is captured and run.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

import fxlens
from fxlens.errors import CaptureError

from conftest import DATA, RTOL, hf_model, oracle_model, rel_err

GPT2 = DATA / "models" / "gpt2"
# 600 KB of CPU for a 750 KB model: embeddings and block 0 on the CPU, the rest on disk
MAX_MEMORY = {"cpu": "600KB"}


@functools.lru_cache(maxsize=None)
def placed():
    return fxlens.capture(GPT2, device_map="auto", max_memory=MAX_MEMORY)


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose mapping holds `t`'s data (None or '[heap]': anonymous memory)."""
    ptr = t.data_ptr()
    for line in open("/proc/self/maps"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= ptr < hi:
            parts = line.split()
            return parts[5] if len(parts) > 5 else None
    return None


def test_auto_map_splits_cpu_and_disk():
    dm = placed().device_map
    assert dm["transformer.h.0"] == "cpu" and dm["transformer.wte"] == "cpu"
    assert dm["transformer.h.1"] == dm["transformer.h.2"] == "disk"


def test_disk_weights_stay_in_the_file_and_cpu_weights_in_memory():
    gm = fxlens.from_pretrained_no_processing(placed()).graph_module
    params = dict(gm.named_parameters())
    assert _mapped_file(params["transformer.h.1.attn.c_attn.weight"]).endswith("model.safetensors")
    assert not (_mapped_file(params["transformer.h.0.attn.c_attn.weight"]) or "").endswith(".safetensors")


def test_placed_model_equals_hf_and_the_in_memory_model():
    model = fxlens.from_pretrained_no_processing(placed())
    ref = oracle_model("gpt2")
    tokens = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    logits, cache = model.run_with_cache(tokens)
    want_logits, want = ref.run_with_cache(tokens)
    assert rel_err(logits, hf_model("gpt2")(tokens).logits) <= RTOL
    assert list(cache.keys()) == list(want.keys())
    for name in want.keys():   # same graph, same weights, same device: bit for bit
        assert torch.equal(cache[name], want[name]), name

    # a hook on a disk-offloaded block edits the run as it does in memory
    def ablate(z, hook):
        return torch.zeros_like(z)

    hooks = [("blocks.2.attn.hook_z", ablate)]
    edited = model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert torch.equal(edited, ref.run_with_hooks(tokens, fwd_hooks=hooks))
    assert not torch.equal(edited, logits)


def test_processing_on_a_placed_capture_keeps_log_probs():
    model = fxlens.from_pretrained(placed())
    tokens = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    want = hf_model("gpt2")(tokens).logits.log_softmax(-1)
    assert rel_err(model(tokens).log_softmax(-1), want) <= RTOL
    assert model.processing.applied["fold_ln"]


def test_device_map_errors():
    with pytest.raises(TypeError, match="not a loaded model"):
        fxlens.capture(hf_model("gpt2"), device_map="cpu")
    with pytest.raises(TypeError, match="device_map='auto'"):
        fxlens.capture(GPT2, device_map="cpu", max_memory={"cpu": "1GB"})


# Run in a fresh process: in a long pytest process, memory freed by earlier tests
# can stay mapped and be reused, so the limit would not bite where it should.
_LIMITED = r"""
import re, resource, sys, torch, fxlens
path, full, limit, small = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
# import everything a placed capture uses (lazy imports need memory too) on the small model first
fxlens.from_pretrained_no_processing(small, device_map={"": "disk"})(torch.zeros(1, 3, dtype=torch.long))
vm = int(re.search(r"VmData:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
resource.setrlimit(resource.RLIMIT_DATA, (vm + limit, hard))
try:
    torch.empty(full, dtype=torch.uint8)
    sys.exit("the memory limit did not bite")
except RuntimeError as exc:
    assert "can't allocate memory" in str(exc), exc
model = fxlens.from_pretrained_no_processing(path, device_map={"": "disk"})
tokens = torch.load(path + "/tokens.pt")
with torch.no_grad():
    torch.save(model(tokens), path + "/got.pt")
"""


def test_checkpoint_larger_than_the_memory_limit(tmp_path):
    import subprocess
    import sys

    from transformers import AutoConfig, AutoModelForCausalLM

    # 114 MiB of float32 weights (a 50257 x 512 embedding, two blocks)
    cfg = AutoConfig.for_model("gpt2", vocab_size=50257, n_embd=512, n_layer=2, n_head=8, n_positions=64,
                               n_inner=1024, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    hf.save_pretrained(tmp_path)
    full = sum(p.numel() * p.element_size() for p in hf.parameters())
    tokens = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    with torch.no_grad():
        want = hf(tokens).logits
    del hf
    # the limit: 64 MiB of private memory more than the fresh process has, about half the weights
    limit = 64 * 2**20
    assert full > 1.5 * limit
    run = subprocess.run([sys.executable, "-c", _LIMITED, str(tmp_path), str(full), str(limit), str(GPT2)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = torch.load(tmp_path / "got.pt")
    assert rel_err(got, want) <= RTOL
