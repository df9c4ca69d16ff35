#!/usr/bin/env bash
# Creates the Python environment used only by reference scripts and gated parity checks
# (PyTorch + transformers + PEFT + gguf + TensorBoard, CPU). helix itself never needs Python.
# Usage: scripts/setup-python.sh            -> prints the venv's python path on its last line
# The venv lives in $HELIX_PYENV (default ~/.cache/helix/pyenv) and is reused when complete.
set -euo pipefail
venv="${HELIX_PYENV:-$HOME/.cache/helix/pyenv}"
stamp="$venv/.helix-complete-v2"
if [ ! -f "$stamp" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip >&2
  # CPU wheels of torch come from PyPI with their CUDA runtime packages; CPU code paths work without a GPU.
  "$venv/bin/pip" install -q --disable-pip-version-check \
    torch==2.11.0 transformers==4.57.1 peft==0.17.1 gguf==0.17.1 tensorboard==2.21.0 safetensors numpy sentencepiece protobuf >&2
  touch "$stamp"
fi
echo "$venv/bin/python"
