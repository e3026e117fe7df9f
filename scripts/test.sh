#!/usr/bin/env bash
# The whole test suite. It needs a PostgreSQL and a Redis: scripts/services.sh
# reuses running ones or starts throwaway ones (installing them if needed).
#
#  1. every test: unit tests, the behaviour suite on the embedded backend,
#     the multi-pod and fault tests (which always use PostgreSQL + Redis);
#  2. the behaviour suite again, unchanged, on PostgreSQL + Redis;
#  3. the OpenAPI / AsyncAPI / generated-SDK / schemathesis tests (tests/sdk);
#  4. the web client in headless Chromium, two users (tests/web);
#  5. the dependency policy (deny.toml, scripts/audit.sh);
#  6. the Helm chart checks (deploy/check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services.sh
source scripts/services.sh
cargo test --locked --all-targets
CHAT_TEST_BACKEND=cluster cargo test --locked --test api -- --skip cluster:: --skip faults::
tests/sdk/run.sh
tests/web/run.sh
scripts/audit.sh
deploy/check.sh
