#!/usr/bin/env bash
# helix against transformers + PEFT on this CPU, side by side in one command: one LoRA step of
# SmolLM2-135M (4 × 256 tokens; see benches/train_step.rs and scripts/cpu_step_pytorch.py),
# PyTorch before and after helix so a drift in the machine shows. Prints the medians and the
# helix / PyTorch ratio (below 1: helix is faster).
#
#   scripts/cpu-step-vs-pytorch.sh [MODEL_DIR]   (default models/smollm2-135m-instruct)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/smollm2-135m-instruct}
[ -f "$model/config.json" ] || {
    echo "$model: no config.json (scripts/fetch-smollm2.sh imports SmolLM2)" >&2
    exit 1
}
py=$(scripts/setup-python.sh | tail -1)
threads=$(nproc)
export OMP_NUM_THREADS=$threads RAYON_NUM_THREADS=$threads
before=$("$py" scripts/cpu_step_pytorch.py "$model" 10)
echo "$before"
bench=$(HELIX_SMOLLM2="$model" cargo bench --workspace --bench train_step -- smollm2_step 2>&1)
line=$(echo "$bench" | grep -A1 "smollm2_step/lora_4x256" | grep "time:" | head -1)
echo "helix:   $line"
after=$("$py" scripts/cpu_step_pytorch.py "$model" 10)
echo "$after"
python3 - "$before" "$line" "$after" <<'PY'
import re, sys
unit = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
def torch_median(text):
    return float(re.search(r"median ([0-9.]+) s", text).group(1))
def helix_median(text):
    vals = re.findall(r"([0-9.]+) (ns|µs|us|ms|s)\b", text.split("time:")[1])
    v, u = vals[1]
    return float(v) * unit[u]
t1, h, t2 = torch_median(sys.argv[1]), helix_median(sys.argv[2]), torch_median(sys.argv[3])
t = (t1 + t2) / 2
print(f"SmolLM2-135M LoRA step, 4 x 256 tokens, CPU: helix {h:.3f} s, PyTorch {t:.3f} s "
      f"(runs {t1:.3f} and {t2:.3f}); helix / PyTorch = {h / t:.2f}")
PY
