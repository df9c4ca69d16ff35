#!/usr/bin/env bash
# Builds the GPU helix-train on this CPU-only machine (toolchain from PyPI, see
# scripts/setup-cuda-build.sh) with features cuda,nccl into target/cuda, strips it and gzips
# it to dist/helix-train.gz, the one file to carry to the GPU machine (with the device tool:
# carry ["dist"], then run scripts/gpu-check.sh there, which unpacks it), with the Llama 2
# tokenizer from ../shared for the device's training smoke run. Stripped it is about
# 68 MB (candle's and helix's PTX), over the 64 MiB a carried tree may hold; gzipped, 17 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup-cuda-build.sh)"
cargo build --release -p helix-train --features cuda,nccl --target-dir target/cuda
mkdir -p dist
strip -o dist/helix-train target/cuda/release/helix-train
gzip -9 -f dist/helix-train
# The Llama 2 tokenizer (1.8 MB) for the device's training smoke run, from ../shared.
tok=../shared/assets/llama2-tokenizer
if [ -d "$tok" ]; then
  mkdir -p dist/llama2-tokenizer
  cp -f "$tok"/tokenizer.json "$tok"/tokenizer_config.json "$tok"/special_tokens_map.json dist/llama2-tokenizer/
fi
ls -l dist/helix-train.gz
