#!/usr/bin/env bash
# Builds the GPU helix-train on this CPU-only machine (toolchain from PyPI, see
# scripts/setup-cuda-build.sh) with features cuda,nccl into target/cuda, strips it and gzips
# it to dist/helix-train.gz, the one file to carry to the GPU machine (with the device tool:
# carry ["dist"], then run scripts/gpu-check.sh there, which unpacks it). Stripped it is about
# 68 MB (candle's and helix's PTX), over the 64 MiB a carried tree may hold; gzipped, 17 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup-cuda-build.sh)"
cargo build --release -p helix-train --features cuda,nccl --target-dir target/cuda
mkdir -p dist
strip -o dist/helix-train target/cuda/release/helix-train
gzip -9 -f dist/helix-train
ls -l dist/helix-train.gz
