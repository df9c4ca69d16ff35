#!/usr/bin/env bash
# On the GPU machine: where one training step's GPU time goes, kernel by kernel, helix beside
# transformers + PEFT on the same shapes (Llama-2-7B widths, random bf16 weights, one row of
# SEQ tokens, the first LAYERS decoder layers). Each side runs one step, without warm-up, under
# Nsight Compute (kernel durations only, caches and clocks left alone), so the sums also hold
# the one-time kernels that draw the random weights; scripts/ncu_summary.py sums each CSV by
# kernel.
# The CSVs stay in $OUT/gpu-profile (or /tmp/gpu-profile).
# Usage: scripts/gpu-profile.sh [METHOD=lora|sft] [LAYERS=2] [SEQ=2048]
set -uo pipefail
cd "$(dirname "$0")/.."
method=${1:-lora}
layers=${2:-2}
seq=${3:-2048}
source scripts/gpu-env.sh
ncu=${NCU:-/usr/local/cuda/bin/ncu}
out=${OUT:-/tmp}/gpu-profile
mkdir -p "$out"
config=configs/bench/lora7b.toml
[ "$method" = sft ] && config=configs/bench/sft7b.toml
profile=("$ncu" --metrics gpu__time_duration.sum --cache-control none --clock-control none
  --print-summary per-kernel --csv)
echo "== helix, $method, $layers layers, 1 x $seq"
"${profile[@]}" "$BIN" bench --config "$config" --random-weights --layers "$layers" --seq "$seq" \
  --warmup 0 --steps 1 > "$out/helix-$method.csv" 2> "$out/helix-$method.log" \
  && python3 scripts/ncu_summary.py "$out/helix-$method.csv" \
  || { echo "helix profile failed:"; tail -5 "$out/helix-$method.log"; }
echo "== PyTorch + PEFT, $method, $layers layers, 1 x $seq"
"${profile[@]}" python3 scripts/gpu_step_pytorch.py --method "$method" --layers "$layers" \
  --seq "$seq" --warmup 0 --steps 1 > "$out/torch-$method.csv" 2> "$out/torch-$method.log" \
  && python3 scripts/ncu_summary.py "$out/torch-$method.csv" \
  || { echo "PyTorch profile failed:"; tail -5 "$out/torch-$method.log"; }
