#!/usr/bin/env bash
# The web client's end-to-end test (run by scripts/test.sh, or alone): the
# real `chat-service` binary with --dev-tokens on a free port and a temp
# SQLite file, driven by Playwright in headless Chromium as two users
# (chat.spec.mjs). Screenshots go to target/web-artifacts/.
#
# Self-installing and idempotent: Debian's chromium is installed with
# apt-get only when /usr/bin/chromium is missing (needs root), and
# playwright-core (pinned by package-lock.json; it never downloads a
# browser) goes to a folder under the user's cache directory, outside the
# repository, reinstalled only when package.json / package-lock.json change.
#
# Extra arguments go to `node --test`, e.g. `tests/web/run.sh --test-name-pattern=offline`.
set -euo pipefail
cd "$(dirname "$0")/../.."
web=tests/web
cache="${XDG_CACHE_HOME:-$HOME/.cache}"
node_dir="$cache/chat-service-web-node"

say() { printf 'web: %s\n' "$*" >&2; }

fingerprint() { cat "$@" | sha256sum | cut -d' ' -f1; }

apt_install() {
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        say "$* needed; install it (Debian: apt-get install $*)" && exit 1
    fi
    say "installing $* with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

browser="${CHAT_WEB_CHROMIUM:-/usr/bin/chromium}"
if [[ ! -x $browser ]]; then
    apt_install chromium
fi
if ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
fi

want=$(fingerprint "$web/package.json" "$web/package-lock.json")
if [[ $(cat "$node_dir/.installed" 2>/dev/null) != "$want" ]]; then
    say "installing playwright-core into $node_dir"
    mkdir -p "$node_dir"
    cp "$web/package.json" "$web/package-lock.json" "$node_dir/"
    (cd "$node_dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    echo "$want" >"$node_dir/.installed"
fi

# The binary under test (already built when cargo test ran before).
cargo build --locked --quiet --bin chat-service

export CHAT_WEB_NODE_DIR="$node_dir"
export CHAT_WEB_CHROMIUM="$browser"
export CHAT_SERVICE_BIN="$PWD/target/debug/chat-service"
export CHAT_WEB_ARTIFACTS="$PWD/target/web-artifacts"
mkdir -p "$CHAT_WEB_ARTIFACTS"
node --test --test-reporter=spec "$@" "$web/chat.spec.mjs"
say "screenshots in $CHAT_WEB_ARTIFACTS"
