# Sourced by the scripts that run helix-train on SmolLM2-135M-Instruct and compare runs
# (activation-memory.sh, sequence-parallel-memory.sh): sets $model (the HF directory, or
# HELIX_SMOLLM2), builds the release binary ($helix) and makes a scratch directory ($out,
# removed on exit).
model=${HELIX_SMOLLM2:-models/smollm2-135m-instruct}
if [ ! -f "$model/config.json" ]; then
  echo "$model: not found; scripts/quickstart.sh (or scripts/fetch-smollm2.sh + helix-train import) makes it" >&2
  exit 2
fi
cargo build --release -q -p helix-train
helix=./target/release/helix-train
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
