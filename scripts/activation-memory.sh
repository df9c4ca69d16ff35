#!/usr/bin/env bash
# What activation checkpointing saves and costs, measured: the same LoRA (or --method sft) run
# on SmolLM2-135M-Instruct, f32 on this CPU, rows of SEQ tokens, with
# trainer.activation_checkpointing = "none" and then "full". Prints each run's peak resident
# memory (the process's VmHWM, which includes the weights and optimizer state) and median step
# time, and the ratios, and beside the memory saved what `helix-train plan` predicts it saves
# (its activations kept minus those under recomputation, for the same shape and dtype). The
# losses of the two runs must agree (they do not change).
# Usage: scripts/activation-memory.sh [SEQ=512] [MICRO_BATCH=2] [--method lora|sft]
set -euo pipefail
cd "$(dirname "$0")/.."
seq=${1:-512}
micro=${2:-2}
method=lora
[ "${3:-}" = "--method" ] && method=${4:?--method needs lora or sft}
. scripts/smollm2-run-setup.sh

run() {
  local mode=$1
  "$helix" --config configs/quickstart.toml \
    --set "model.path=$model" --set "method.name=$method" \
    --set "data.max_seq_length=$seq" --set "batch.micro_batch_size=$micro" \
    --set "batch.global_batch_size=$micro" --set trainer.max_steps=4 \
    --set trainer.val_check_interval=0 --set trainer.limit_val_batches=1 \
    --set data.validation_fraction=0.01 --set trainer.save_interval=0 \
    --set output.adapter=false --set trainer.resume=never \
    --set "trainer.output_dir=$out/$mode" --set "trainer.activation_checkpointing=$mode" \
    2> "$out/$mode.log" || {
    local rc=$?
    cat "$out/$mode.log" >&2
    [ $rc -eq 137 ] && echo "activation_checkpointing=$mode: killed (out of memory?)" >&2
    exit $rc
  }
  local peak
  peak=$(grep -o 'peak host memory [0-9.]* [KMGT]*i*B' "$out/$mode.log" | awk '{print $4, $5}')
  echo "$peak"
}

median_step() {
  python3 - "$1/metrics.jsonl" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
# The first step pays for allocation and warm-up; the median of the rest.
t = [r["step_time_s"] for r in rows if r.get("step_time_s") is not None][1:]
print(f"{statistics.median(t):.3f}")
EOF
}

losses() {
  python3 scripts/metrics_losses.py "$1/metrics.jsonl"
}

to_mib() {
  python3 -c 'import sys; v, u = sys.argv[1], sys.argv[2]; f = {"B": 1/2**20, "KiB": 1/1024, "MiB": 1, "GiB": 1024, "TiB": 2**20}[u]; print(float(v) * f)' "$1" "$2"
}

echo "SmolLM2-135M $method, f32 on CPU, $micro row(s) of $seq tokens per step"
none=$(run none)
full=$(run full)
none_s=$(median_step "$out/none")
full_s=$(median_step "$out/full")
printf '%-6s peak host memory %-10s median step %s s\n' none "$none" "$none_s" full "$full" "$full_s"
python3 - "$(to_mib $none)" "$(to_mib $full)" "$none_s" "$full_s" <<'EOF'
import sys
n, f, ns, fs = map(float, sys.argv[1:])
print(f"full / none: peak memory {f / n:.2f} ({n - f:.0f} MiB less), step time {fs / ns:.2f}")
EOF
predicted=$("$helix" plan --config configs/quickstart.toml --set "model.path=$model" \
  --set "method.name=$method" --set "data.max_seq_length=$seq" \
  --set "batch.micro_batch_size=$micro" --set "batch.global_batch_size=$micro" \
  --nodes 1 --gpus-per-node 1 --json |
  python3 -c 'import json, sys; p = json.load(sys.stdin)["plan"]; print((p["activation_bytes_kept"] - p["activation_bytes_recomputed"]) / 2**20)')
python3 - "$(to_mib $none)" "$(to_mib $full)" "$predicted" <<'EOF'
import sys
n, f, p = map(float, sys.argv[1:])
print(f"memory saved: measured {n - f:.0f} MiB, helix-train plan predicts {p:.0f} MiB ({p / (n - f):.2f} of it)")
EOF
none_losses=$(losses "$out/none")
full_losses=$(losses "$out/full")
if [ -z "$full_losses" ] || [ "$none_losses" != "$full_losses" ]; then
  echo "the losses differ:" >&2
  echo "none: $none_losses" >&2
  echo "full: $full_losses" >&2
  exit 1
fi
echo "losses identical to 6 decimals: $full_losses"
