#!/usr/bin/env bash
# On the GPU machine, from the repository root with dist/helix-train.gz carried there
# (scripts/build-cuda.sh builds it; it is unpacked here): points the loader at the NVIDIA libraries of the machine's
# Python packages, prints the GPU, compares every fused CUDA kernel with its CPU reference
# (forward and gradients, f32 and bf16) and times it fused and unfused, then runs the
# comparison again under compute-sanitizer memcheck, then checks NCCL through the launcher
# (one rank: the machine has one GPU; several ranks are proven on the CPU backend) and times
# its all-reduce, and trains 20 LoRA steps of a small random Llama on the GPU through the
# launcher (configs/bench/gpu-smoke.toml). Exits non-zero on any mismatch or error.
# Usage: scripts/gpu-check.sh [BINARY=dist/helix-train]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-dist/helix-train}
if [ ! -x "$bin" ] && [ -f "$bin.gz" ]; then
  gzip -dc "$bin.gz" > "$bin"
  chmod +x "$bin"
fi
site=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')
libs=$(find "$site/nvidia" -maxdepth 3 -type d -name lib | tr '\n' ':')
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== kernel-check"
"$bin" kernel-check --repeats 20
echo "== comm-check: NCCL, one rank through the launcher"
"$bin" --nproc-per-node 1 comm-check --megabytes 256 --repeats 20
echo "== one GPU training run: LoRA, bf16, NCCL (configs/bench/gpu-smoke.toml)"
python3 scripts/make_random_llama.py dist/gpu-model dist/llama2-tokenizer
rm -rf runs/gpu-smoke
"$bin" --nproc-per-node 1 --config configs/bench/gpu-smoke.toml 2>&1 | tee /tmp/gpu-smoke.log | tail -n 12
grep -q "on cuda:0 (collectives: nccl)" /tmp/gpu-smoke.log || { echo "the run did not train on cuda:0 over NCCL" >&2; exit 4; }
echo "== compute-sanitizer memcheck"
sanitizer=$(command -v compute-sanitizer || find / -name compute-sanitizer -type f -perm -u+x 2>/dev/null | head -n 1 || true)
if [ -z "$sanitizer" ]; then
  echo "compute-sanitizer: not found on this machine" >&2
  exit 3
fi
"$sanitizer" --tool memcheck --error-exitcode 9 "$bin" kernel-check --repeats 0 | tail -n 3
