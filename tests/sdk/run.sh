#!/usr/bin/env bash
# The OpenAPI / AsyncAPI / SDK tests (run by scripts/test.sh, or alone):
#
#  - openapi.yaml validated by openapi-spec-validator, asyncapi.yaml by the
#    AsyncAPI parser (@asyncapi/parser), both checked for what SDK
#    generators and client developers need (test_specs.py);
#  - a Python client generated from openapi.yaml by openapi-python-client,
#    used against the real server (test_sdk.py);
#  - live WebSocket frames checked against asyncapi.yaml (test_websocket.py);
#  - schemathesis against the real server (test_schemathesis.py,
#    parameters in schemathesis.toml).
#
# Self-installing and idempotent: the pinned Python tools go to a venv and
# the npm packages to a folder, both under the user's cache directory
# (outside the repository), and are reinstalled only when
# requirements.txt / package-lock.json change. Needs python3 (3.10+) with
# venv, node and npm, and a reachable PyPI and npm registry the first time.
#
# Extra arguments go to pytest, e.g. `tests/sdk/run.sh -k schemathesis -s`.
set -euo pipefail
cd "$(dirname "$0")/../.."
sdk=tests/sdk
cache="${XDG_CACHE_HOME:-$HOME/.cache}"
venv="$cache/chat-service-sdk-venv"
node_dir="$cache/chat-service-sdk-node"

say() { printf 'sdk: %s\n' "$*" >&2; }

fingerprint() { cat "$@" | sha256sum | cut -d' ' -f1; }

# Python tools, pinned.
want=$(fingerprint "$sdk/requirements.txt")
if [[ ! -x $venv/bin/python || $(cat "$venv/.installed" 2>/dev/null) != "$want" ]]; then
    say "installing Python tools into $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$sdk/requirements.txt"
    echo "$want" >"$venv/.installed"
fi

# The AsyncAPI parser, pinned by package-lock.json.
if ! command -v npm >/dev/null 2>&1; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing nodejs and npm with apt-get"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
    else
        say "node and npm are needed (for @asyncapi/parser); install them" && exit 1
    fi
fi
want=$(fingerprint "$sdk/package.json" "$sdk/package-lock.json")
if [[ $(cat "$node_dir/.installed" 2>/dev/null) != "$want" ]]; then
    say "installing @asyncapi/parser into $node_dir"
    mkdir -p "$node_dir"
    cp "$sdk/package.json" "$sdk/package-lock.json" "$node_dir/"
    (cd "$node_dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    echo "$want" >"$node_dir/.installed"
fi

# The binary under test (already built when cargo test ran before).
cargo build --locked --quiet --bin chat-service

export CHAT_SDK_NODE_DIR="$node_dir"
export CHAT_SERVICE_BIN="$PWD/target/debug/chat-service"
export PYTHONDONTWRITEBYTECODE=1
# -p no:cacheprovider: no .pytest_cache in the repository.
"$venv/bin/python" -m pytest "$sdk" -p no:cacheprovider -q "$@"
