#!/usr/bin/env bash
# Fuzzes every parser that sees untrusted bytes, SECONDS each (default 60):
#
#   client_frame   a client's WebSocket text frame (protocol::ClientFrame)
#   jwt            token transports and verification (auth)
#   query_params   the handshake query and the ids of every route
#   rest_bodies    REST request bodies (api::types)
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Each target starts from its committed corpus, fuzz/corpus/<target>/, which
# is only read; new inputs go to fuzz/target/corpus/<target>/ (ignored by
# git). A crash stops the script with a non-zero status and leaves its input
# in fuzz/artifacts/<target>/: turn it into a regression test, fix, then add
# the input to the committed corpus. To fold new interesting inputs into the
# committed corpus, keeping it small (the fewest inputs that reach every
# edge reached so far):
#   mkdir -p fuzz/target/fold/TARGET
#   fuzz/target/x86_64-unknown-linux-gnu/release/TARGET -set_cover_merge=1 \
#       -use_counters=0 fuzz/target/fold/TARGET fuzz/corpus/TARGET fuzz/target/corpus/TARGET
# then copy fuzz/target/fold/TARGET/* into fuzz/corpus/TARGET/.
#
# cargo fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them. cargo-fuzz is installed on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(client_frame jwt query_params rest_bodies)
fi
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
cargo fuzz build --fuzz-dir fuzz
for target in "${targets[@]}"; do
    scratch="fuzz/target/corpus/$target"
    mkdir -p "$scratch" "fuzz/corpus/$target"
    echo "fuzz: $target for ${seconds}s"
    cargo fuzz run --fuzz-dir fuzz "$target" "$scratch" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1
done
