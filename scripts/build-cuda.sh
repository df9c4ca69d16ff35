#!/usr/bin/env bash
# Builds the GPU helix-train on this CPU-only machine (toolchain from PyPI, see
# scripts/setup-cuda-build.sh) with features cuda,nccl into target/cuda, strips it and copies it
# to dist/helix-train, the one binary to carry to the GPU machine (with the device tool:
# carry ["dist"], then run scripts/gpu-check.sh there).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup-cuda-build.sh)"
cargo build --release -p helix-train --features cuda,nccl --target-dir target/cuda
mkdir -p dist
strip -o dist/helix-train target/cuda/release/helix-train
ls -l dist/helix-train
