#!/usr/bin/env bash
# The hardening suite in one command: kill -9 at 20 random moments, a full disk during a save,
# a non-finite loss, a kill during a save and a damaged shard (single process); a rank killed
# and a rank frozen in a 4-rank job, a wrong job token and garbage on the rendezvous port;
# hostile checkpoint, index, header and tokenizer files; the 2,000-step long run; then every
# fuzz target for FUZZ_SECONDS (default 600; 0 skips fuzzing). Each part prints its figures.
#
#   scripts/fault-suite.sh [FUZZ_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
fuzz_secs=${1:-600}
# The full-disk case mounts a tmpfs; as root it must run, not skip.
if [ "$(id -u)" = 0 ]; then
    export HELIX_REQUIRE_FAULTS=1
fi
step() {
    echo "== $*" >&2
    "$@"
}
step cargo test --workspace -p helix-train --test resume_cli -- --nocapture --test-threads 1 \
    kill_9_at_random_moments a_full_disk a_kill_during_a_save a_non_finite_loss
step cargo test --workspace -p helix-train --test parallel_cli -- --nocapture \
    a_killed_rank a_stopped_rank garbage_on_the_rendezvous_port a_connection_with_the_wrong_job_token
step cargo test --workspace -- --nocapture \
    outside a_header_claiming_absurd_sizes a_tokenizer_file_that_fails flipped_byte records::
step cargo test --workspace -p helix-train --test long_run -- --ignored --nocapture
if [ "$fuzz_secs" -gt 0 ]; then
    step scripts/fuzz.sh "$fuzz_secs"
fi
echo "fault suite: every case passed" >&2
