#!/usr/bin/env bash
# Renders the Helm chart with real Helm (helm-python-sdk: Helm v4's Go SDK as
# a shared library, no helm binary) and validates everything it produces.
# See deploy/README.md ("Checks"). Tools live in a venv outside the repo,
# pinned in deploy/requirements.txt; reinstalled only when that file changes.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${XDG_CACHE_HOME:-$HOME/.cache}/chat-service-deploy-venv"
stamp="$venv/.requirements.sha256"
want="$(sha256sum deploy/requirements.txt | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r deploy/requirements.txt
  echo "$want" >"$stamp"
fi
# The helm test script is also run against the real binary.
cargo build --quiet --locked --bin chat-service
exec "$venv/bin/python" deploy/validate.py "$@"
