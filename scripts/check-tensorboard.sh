#!/usr/bin/env bash
# Gated check of `output.tensorboard`: a tiny LoRA run killed at step 12 and resumed from its
# step-10 checkpoint (tests/resume_cli.rs), its event files then read by TensorBoard itself
# (the classic and plugin accumulators, and a `tensorboard --logdir` server over HTTP), every
# scalar compared with metrics.jsonl (scripts/tensorboard_check.py). Needs PyPI the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(scripts/setup-python.sh)
out=$(realpath -m "${HELIX_CHECK_DIR:-models/check}")/tensorboard-run
rm -rf "$out"
HELIX_TENSORBOARD_OUT="$out" cargo test -q --workspace -p helix-train --test resume_cli \
  tensorboard_events_follow_metrics_jsonl_across_a_resume
"$py" scripts/tensorboard_check.py --run "$out" 2> >(grep -v -e "out of order event.step" -e "TensorFlow installation not found" >&2)
