#!/usr/bin/env bash
# Gated check of the data pipeline on real data: the 4,000 Alpaca rows of ../shared with the
# Llama 2 tokenizer, against Stanford Alpaca's preprocessing run by transformers
# (scripts/alpaca_llama2_reference.py), through tests/alpaca_llama2.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${HELIX_SHARED:-../shared}"
alpaca="$shared/assets/alpaca/alpaca_4000.json"
tokenizer="$shared/assets/llama2-tokenizer"
for p in "$alpaca" "$tokenizer/tokenizer.json"; do
  [ -f "$p" ] || { echo "check-llama2-data: $p not found (set HELIX_SHARED)" >&2; exit 1; }
done
py=$(scripts/setup-python.sh)
work="${HELIX_CHECK_DIR:-models/check}"
mkdir -p "$work"
ref="$work/alpaca_llama2_ref.jsonl"
if [ ! -f "$ref" ] || [ scripts/alpaca_llama2_reference.py -nt "$ref" ]; then
  "$py" scripts/alpaca_llama2_reference.py --alpaca "$alpaca" --tokenizer "$tokenizer" \
    --out "$ref" 2> >(grep -v "legacy" >&2)
fi
HELIX_ALPACA="$alpaca" HELIX_LLAMA2_TOKENIZER="$tokenizer" HELIX_ALPACA_LLAMA2_REF="$ref" \
  cargo test -q --workspace --test alpaca_llama2 -- --nocapture
