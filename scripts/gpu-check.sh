#!/usr/bin/env bash
# On the GPU machine, from the repository root with dist/helix-train.gz carried there
# (scripts/build-cuda.sh builds it; it is unpacked here): points the loader at the NVIDIA libraries of the machine's
# Python packages, prints the GPU, compares every fused CUDA kernel with its CPU reference
# (forward and gradients, f32 and bf16) and times it fused and unfused, checks NCCL through the
# launcher (one rank: the machine has one GPU; several ranks are proven on the CPU backend) and
# times its all-reduce, trains 20 LoRA steps of a small random Llama on the GPU through the
# launcher (configs/bench/gpu-smoke.toml), then runs the kernel comparison again under
# compute-sanitizer: memcheck over every kernel (out-of-bounds and misaligned accesses), then
# over the FlashAttention kernels alone (the slower tools) racecheck (shared-memory hazards
# between threads: a barrier missing around the cp.async buffers) and synccheck (barriers used
# where not every thread reaches them).
# Every part runs even when an earlier one fails (device time is scarce: one call should say
# everything); the exit status is non-zero when any part failed, and the last line names them.
# Usage: scripts/gpu-check.sh [BINARY=dist/helix-train]
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-dist/helix-train}
source scripts/gpu-env.sh
bin=$BIN
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
failed=()
part() { # part NAME COMMAND...: runs one part, remembers it when it fails
  local name=$1
  shift
  echo "== $name"
  "$@" || { echo "!! $name failed (exit $?)"; failed+=("$name"); }
}
smoke() {
  python3 scripts/make_random_llama.py dist/gpu-model dist/llama2-tokenizer || return 1
  rm -rf runs/gpu-smoke
  "$bin" --nproc-per-node 1 --config configs/bench/gpu-smoke.toml > /tmp/gpu-smoke.log 2>&1
  local rc=$?
  tail -n 12 /tmp/gpu-smoke.log
  [ $rc -eq 0 ] || return $rc
  grep -q "on cuda:0 (collectives: nccl)" /tmp/gpu-smoke.log \
    || { echo "the run did not train on cuda:0 over NCCL" >&2; return 4; }
}
sanitize() { # sanitize TOOL [KERNEL-CHECK FLAGS]: kernel-check once under compute-sanitizer's TOOL
  local sanitizer tool=$1
  shift
  sanitizer=$(command -v compute-sanitizer || find / -name compute-sanitizer -type f -perm -u+x 2>/dev/null | head -n 1 || true)
  [ -n "$sanitizer" ] || { echo "compute-sanitizer: not found on this machine" >&2; return 3; }
  "$sanitizer" --tool "$tool" --error-exitcode 9 "$bin" kernel-check --repeats 0 "$@" > "/tmp/$tool.log" 2>&1
  local rc=$?
  tail -n 3 "/tmp/$tool.log"
  return $rc
}
part "kernel-check" "$bin" kernel-check --repeats 20
part "comm-check: NCCL, one rank through the launcher" \
  "$bin" --nproc-per-node 1 comm-check --megabytes 256 --repeats 20
part "one GPU training run: LoRA, bf16, NCCL (configs/bench/gpu-smoke.toml)" smoke
part "compute-sanitizer memcheck" sanitize memcheck
flash=(--op flash_attention --op flash_attention_rows64)
part "compute-sanitizer racecheck, FlashAttention" sanitize racecheck "${flash[@]}"
part "compute-sanitizer synccheck, FlashAttention" sanitize synccheck "${flash[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu-check: FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu-check: every part passed"
