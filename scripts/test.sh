#!/usr/bin/env bash
# The whole test suite: unit tests and the behaviour suite, each test
# against its own throwaway database.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --locked --all-targets "$@"
