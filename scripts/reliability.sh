#!/usr/bin/env bash
# The long reliability run: the chaos suite at full size, then the fuzzers.
#
#   scripts/reliability.sh                 # 300 clients, 120 s of faults, then 60 s of fuzzing
#   CHAOS_SECONDS=300 CHAOS_CLIENTS=500 FUZZ_SECONDS=600 scripts/reliability.sh
#
# The chaos suite (tests/chaos.rs, docs/reliability.md) starts its own
# PostgreSQL and Redis processes so that it can kill them; scripts/services.sh
# only finds (or installs) their binaries. The figures are printed and
# written to target/chaos-report.json. A short version of the same suite
# runs in CI as part of `cargo test --all-targets` (scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services.sh
source scripts/services.sh
export CHAOS_SECONDS="${CHAOS_SECONDS:-120}"
export CHAOS_CLIENTS="${CHAOS_CLIENTS:-300}"
cargo build --release --locked --bins --test chaos
cargo test --release --locked --test chaos -- --nocapture
if [[ -f scripts/fuzz.sh ]]; then
    bash scripts/fuzz.sh "${FUZZ_SECONDS:-60}"
else
    echo "reliability: scripts/fuzz.sh not found; skipping the fuzzers" >&2
fi
