#!/usr/bin/env bash
# What sequence parallelism saves, measured: the same LoRA (or --method sft) run on
# SmolLM2-135M-Instruct, f32 on this CPU, over three tensor-parallel ranks (its 9 heads, 3 KV
# heads and 49,152-token vocabulary divide by 3), with parallel.sequence_parallel = false and
# then true. Prints rank 0's peak resident memory (VmHWM: weights, optimizer state and
# activations; every rank holds the same shapes), the memory saved beside what
# `helix-train plan` predicts it saves (its
# activations without minus with sequence parallelism, same shape and dtype), and the two
# runs' losses, which must agree (the split changes only the order of some sums).
# Usage: scripts/sequence-parallel-memory.sh [SEQ=1024] [MICRO_BATCH=2] [--method lora|sft]
set -euo pipefail
cd "$(dirname "$0")/.."
seq=${1:-1024}
micro=${2:-2}
method=lora
[ "${3:-}" = "--method" ] && method=${4:?--method needs lora or sft}
tp=3
. scripts/smollm2-run-setup.sh

settings=(--set "model.path=$model" --set "method.name=$method"
  --set "data.max_seq_length=$seq" --set "batch.micro_batch_size=$micro"
  --set "batch.global_batch_size=$micro" --set "parallel.tensor_parallel=$tp")

# Prints rank 0's peak memory in MiB (the rank that reports it).
run() {
  local sp=$1
  "$helix" --nproc-per-node $tp --master-port $((29500 + RANDOM % 1000)) \
    --config configs/quickstart.toml "${settings[@]}" \
    --set trainer.max_steps=3 --set trainer.val_check_interval=0 \
    --set trainer.limit_val_batches=1 --set data.validation_fraction=0.01 \
    --set trainer.save_interval=0 --set output.adapter=false --set trainer.resume=never \
    --set "trainer.output_dir=$out/sp-$sp" --set "parallel.sequence_parallel=$sp" \
    > "$out/sp-$sp.log" 2>&1 || {
    local rc=$?
    cat "$out/sp-$sp.log" >&2
    exit $rc
  }
  python3 - "$out/sp-$sp.log" <<'EOF'
import re, sys
unit = {"B": 1 / 2**20, "KiB": 1 / 1024, "MiB": 1, "GiB": 1024}
found = re.findall(r"\[rank 0\] peak host memory ([0-9.]+) (\w+)", open(sys.argv[1]).read())
if len(found) != 1:
    sys.exit("rank 0 reported no peak host memory")
print(f"{float(found[0][0]) * unit[found[0][1]]:.0f}")
EOF
}

losses() {
  python3 scripts/metrics_losses.py "$1/metrics.jsonl"
}

predicted() {
  "$helix" plan --config configs/quickstart.toml "${settings[@]}" \
    --set "parallel.sequence_parallel=$1" --nodes 1 --gpus-per-node $tp --json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["plan"]["activation_bytes"] / 2**20)'
}

echo "SmolLM2-135M $method, f32 on CPU, tensor parallel $tp, $micro row(s) of $seq tokens per step"
plain=$(run false)
split=$(run true)
python3 - "$plain" "$split" "$(predicted false)" "$(predicted true)" <<'EOF'
import sys
plain, split, p_plain, p_split = map(float, sys.argv[1:])
saved, predicted = plain - split, p_plain - p_split
print(f"rank 0's peak host memory: {plain:.0f} MiB plain, {split:.0f} MiB with sequence "
      f"parallelism ({split / plain:.2f}×)")
print(f"memory saved: measured {saved:.0f} MiB, helix-train plan predicts {predicted:.0f} MiB "
      f"({predicted / saved:.2f} of it)")
EOF
a=$(losses "$out/sp-false")
b=$(losses "$out/sp-true")
python3 - "$a" "$b" <<'EOF'
import sys
a = [float(v) for v in sys.argv[1].split()]
b = [float(v) for v in sys.argv[2].split()]
worst = max(abs(x - y) / abs(x) for x, y in zip(a, b)) if a and len(a) == len(b) else None
if worst is None or worst > 1e-5:
    sys.exit(f"the losses differ: {a} vs {b}")
print(f"losses: {b} (worst relative difference {worst:.1e})")
EOF
