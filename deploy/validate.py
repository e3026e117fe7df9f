"""Offline checks of the Helm chart (run by deploy/check.sh).

For each value set (defaults, every deploy/examples/*.yaml, and a few
variants) it:
  * validates the merged values against values.schema.json (Helm's own
    check, and again with jsonschema);
  * runs `helm lint --strict` and renders the chart with real Helm (the
    helm-python-sdk binding of Helm v4's Go SDK), as install and as upgrade;
  * validates every built-in object with kubernetes-validate (strict: unknown
    fields are errors) and every custom resource against the openAPIV3Schema
    of its CRD in ../shared/crds, with unknown fields rejected;
  * checks that every environment variable the chart sets is one the binary
    reads (src/config.rs), that probes hit routes the service serves on the
    port it listens on, and that the pod outlives its connection drain.
Then it checks that wrong values are rejected. Exit status 1 on any failure.
"""

from __future__ import annotations

import copy
import json
import pathlib
import os
import re
import socket
import subprocess
import sys
import tempfile

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "chat-service"
CRDS = ROOT.parent / "shared" / "crds"
KUBE_VERSION = "1.33.0"

# Secrets a values file must bring when the chart makes the Secret itself.
SECRETS = {
    "secrets": {
        "jwtSecret": "test-secret",
        "databaseUrl": "postgres://chat:pw@postgres:5432/chat",
        "redisUrl": "redis://redis:6379",
    }
}

failures: list[str] = []


def fail(what: str) -> None:
    failures.append(what)
    print(f"FAIL {what}")


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# --- custom resource schemas -------------------------------------------------


def strict_schema(node):
    """A CRD's structural schema with unknown fields rejected, as the API
    server's pruning would drop them (we want them reported instead)."""
    if isinstance(node, dict):
        node = {k: strict_schema(v) for k, v in node.items()}
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        if node.get("x-kubernetes-int-or-string"):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return node
    if isinstance(node, list):
        return [strict_schema(v) for v in node]
    return node


def load_crds() -> dict[tuple[str, str], dict]:
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = strict_schema(version["schema"]["openAPIV3Schema"])
                # metadata is checked by the API server, not the CRD schema.
                schema.setdefault("properties", {})["metadata"] = {"type": "object"}
                schema["properties"]["apiVersion"] = {"type": "string"}
                schema["properties"]["kind"] = {"type": "string"}
                schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


# --- what the binary reads -----------------------------------------------------


def binary_env_vars() -> set[str]:
    config = (ROOT / "src" / "config.rs").read_text()
    names = set(re.findall(r'env = "([A-Z0-9_]+)"', config))
    names |= {f"{name}_FILE" for _, name in re.findall(r'\("([a-z_]+)", "([A-Z_]+)"\)', config)}
    # Read by telemetry (tracing-subscriber's filter, the OpenTelemetry SDK).
    telemetry = (ROOT / "src" / "telemetry.rs").read_text() if (ROOT / "src" / "telemetry.rs").exists() else ""
    names.add("RUST_LOG")
    names |= {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES",
              "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"}
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in telemetry or "OTEL_EXPORTER_OTLP_ENDPOINT" in (ROOT / "README.md").read_text()
    return names


# Variables the chart sets only for Kubernetes' $(VAR) expansion in other
# variables' values; the binary never reads them.
EXPANSION_ONLY = {"POD_NAME", "CNPG_APP_USER", "CNPG_APP_PASSWORD"}


def served_routes() -> set[str]:
    app = (ROOT / "src" / "app.rs").read_text()
    return set(re.findall(r'\.at\("([^"]+)"', app))


def default_port() -> int:
    config = (ROOT / "src" / "config.rs").read_text()
    return int(re.search(r'default_value = "0\.0\.0\.0:(\d+)"', config).group(1))


# --- checks of one value set ---------------------------------------------------


def check_objects(label: str, objects: list[dict], crds: dict, env_ok: set[str], values: dict) -> None:
    routes, port = served_routes(), default_port()
    for obj in objects:
        kind, api = obj["kind"], obj["apiVersion"]
        where = f"{label}: {kind}/{obj['metadata'].get('name')}"
        if (api, kind) in crds:
            errors = sorted(jsonschema.Draft7Validator(crds[(api, kind)]).iter_errors(obj), key=str)
            for err in errors[:5]:
                fail(f"{where}: {'.'.join(map(str, err.absolute_path))}: {err.message}")
        else:
            try:
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                fail(f"{where}: {'.'.join(map(str, err.path))}: {err.message}")
            except kubernetes_validate.utils.SchemaNotFoundError:
                fail(f"{where}: {api} {kind} is neither a built-in kind nor in {CRDS}")
        pod = obj.get("spec", {}).get("template", {}).get("spec") if kind in ("Deployment", "Job") else None
        if kind == "Pod":
            pod = obj["spec"]
        if not pod:
            continue
        for container in pod.get("initContainers", []) + pod["containers"]:
            sc = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
            if not (sc.get("runAsNonRoot") and sc.get("readOnlyRootFilesystem")
                    and sc.get("allowPrivilegeEscalation") is False
                    and sc.get("capabilities", {}).get("drop") == ["ALL"]
                    and sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"):
                fail(f"{where}/{container['name']}: not a restricted security context: {sc}")
            if not container.get("resources", {}).get("limits", {}).get("memory"):
                fail(f"{where}/{container['name']}: no memory limit")
            if not container["image"].startswith(values["image"]["repository"] + ":"):
                continue  # the test pod's Python container: its variables are the script's
            for env in container.get("env", []):
                if env["name"] not in env_ok | EXPANSION_ONLY:
                    fail(f"{where}/{container['name']}: sets {env['name']}, which the binary does not read")
        if kind == "Deployment":
            c = pod["containers"][0]
            env = {e["name"]: e.get("value") for e in c["env"]}
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                got = c[probe]["httpGet"]
                if got["path"] != path or got["path"] not in routes:
                    fail(f"{where}: {probe} path {got['path']} is not the served {path}")
                ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                if ports.get(got["port"], got["port"]) != port or not env.get("LISTEN_ADDR", "").endswith(f":{port}"):
                    fail(f"{where}: {probe} port {got['port']} is not the listen port {port}")
            grace = int(env["SHUTDOWN_GRACE"].rstrip("s"))
            pre = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            if pod["terminationGracePeriodSeconds"] <= pre + grace:
                fail(f"{where}: terminationGracePeriodSeconds does not cover preStop {pre}s + SHUTDOWN_GRACE {grace}s")
            if env.get("TRUST_FORWARDED_FOR") != "true" and values["ingress"]["enabled"]:
                fail(f"{where}: behind an ingress TRUST_FORWARDED_FOR should be true")
            if not pod.get("topologySpreadConstraints") and values["topologySpread"]["enabled"]:
                fail(f"{where}: no topology spread")


def render_set(chart, label: str, overrides: dict, crds: dict, env_ok: set[str], schema: dict) -> list[dict]:
    merged = chart.merge_values(overrides)
    try:
        chart.validate_schema(merged)
    except helm.HelmError as err:
        fail(f"{label}: values rejected by the schema: {err}")
        return []
    for err in jsonschema.Draft7Validator(schema).iter_errors(merged):
        fail(f"{label}: values: {'.'.join(map(str, err.absolute_path))}: {err.message}")
    report = helm.lint(str(CHART), overrides, strict=True, namespace="chat", kube_version=f"v{KUBE_VERSION}")
    for msg in report.get("messages", []):
        if msg.get("severity", 0) >= 2:
            fail(f"{label}: helm lint --strict: {msg.get('path')}: {msg.get('error')}")
    for err in report.get("errors", []) or []:
        fail(f"{label}: helm lint: {err}")
    objects = []
    for mode in ({"is_install": True}, {"is_upgrade": True}):
        rendered = chart.render(overrides, name="chat", namespace="chat", revision=2 if mode.get("is_upgrade") else 1, **mode)
        objects = []
        for path, text in sorted(rendered.items()):
            if path.endswith("NOTES.txt"):
                if mode.get("is_install") and "helm test" not in text:
                    fail(f"{label}: NOTES.txt does not mention helm test")
                continue
            # A digest in an annotation must be quoted: bare, one of digits
            # alone (about one in 1,900) reads as a number, which Kubernetes
            # refuses; a values change made one once.
            for line in text.splitlines():
                digest = re.match(r"\s+(checksum/[\w.-]+):\s*(.*)$", line)
                if digest and not digest.group(2).startswith('"'):
                    fail(f"{label}: {path}: {digest.group(1)} is not quoted: {digest.group(2)}")
            for doc in yaml.safe_load_all(text):
                if doc:
                    objects.append(doc)
        check_objects(f"{label} ({'install' if 'is_install' in mode else 'upgrade'})", objects, crds, env_ok, merged)
    kinds = sorted(f"{o['kind']}" for o in objects)
    print(f"ok   {label}: {len(objects)} objects: {', '.join(kinds)}")
    return objects


def expect_objects(label: str, objects: list[dict], must: set[str], must_not: set[str] = frozenset()) -> None:
    kinds = {o["kind"] for o in objects}
    if missing := must - kinds:
        fail(f"{label}: expected {sorted(missing)} among the rendered kinds")
    if extra := kinds & set(must_not):
        fail(f"{label}: did not expect {sorted(extra)}")


def roundtrip() -> None:
    """Runs the `helm test` script against the real binary, the way the test
    pod does: a token from `chat-service token`, then the WebSocket script."""
    binary = ROOT / "target" / "debug" / "chat-service"
    script = CHART / "files" / "ws_roundtrip.py"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "JWT_SECRET": "roundtrip-secret", "LISTEN_ADDR": f"127.0.0.1:{port}",
               "DATABASE_URL": f"sqlite://{tmp}/chat.db"}
        env.pop("REDIS_URL", None)
        server = subprocess.Popen([binary, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            token = subprocess.run([binary, "token", "--sub", "helm-test", "--name", "helm-test", "--ttl", "5m"],
                                   env=env, check=True, capture_output=True, text=True).stdout
            pathlib.Path(tmp, "token").write_text(token)
            run = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=90,
                                 env={**env, "CHAT_URL": f"ws://127.0.0.1:{port}/ws/chat/global",
                                      "TOKEN_FILE": f"{tmp}/token"})
            if run.returncode != 0:
                fail(f"helm test script against the binary: {run.stdout}{run.stderr}")
            else:
                print(f"ok   helm test script against the binary: {run.stdout.strip()}")
        finally:
            server.terminate()
            server.wait(timeout=30)


def binaries_check(chart, sets: dict, crds: dict, env_ok: set[str]) -> None:
    """The official helm v3 binary lints and renders every value set too, and
    kubectl kustomize --enable-helm renders every overlay; overlay output is
    validated like the chart's."""
    bindir = pathlib.Path(os.environ.get("CHAT_DEPLOY_BIN", ""))
    helm_bin, kubectl = bindir / "helm", bindir / "kubectl"
    if not (helm_bin.exists() and kubectl.exists()):
        fail(f"no helm/kubectl binaries in {bindir} (run deploy/check.sh)")
        return
    version = subprocess.run([helm_bin, "version", "--short"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        for label, values in sets.items():
            vfile = pathlib.Path(tmp, "values.yaml")
            vfile.write_text(yaml.safe_dump(values))
            for cmd in (["lint", "--strict", str(CHART), "-f", str(vfile)],
                        ["template", "chat", str(CHART), "-n", "chat", "-f", str(vfile)]):
                run = subprocess.run([helm_bin, *cmd], capture_output=True, text=True,
                                     env={**os.environ, "HELM_CACHE_HOME": tmp, "HELM_CONFIG_HOME": tmp, "HELM_DATA_HOME": tmp})
                if run.returncode != 0:
                    fail(f"{label}: helm {cmd[0]} ({version}): {run.stdout[-2000:]}{run.stderr[-2000:]}")
        print(f"ok   helm {version} lint --strict and template: {len(sets)} value sets")
        for overlay in sorted((ROOT / "deploy" / "overlays").iterdir()):
            run = subprocess.run([kubectl, "kustomize", "--enable-helm", "--helm-command", helm_bin,
                                  "--load-restrictor", "LoadRestrictionsNone", overlay],
                                 capture_output=True, text=True,
                                 env={**os.environ, "HELM_CACHE_HOME": tmp, "HELM_CONFIG_HOME": tmp, "HELM_DATA_HOME": tmp})
            if run.returncode != 0:
                fail(f"overlay {overlay.name}: kubectl kustomize: {run.stderr[-2000:]}")
                continue
            objects = [d for d in yaml.safe_load_all(run.stdout) if d]
            values = chart.merge_values(overlay_values(overlay))
            check_objects(f"overlay {overlay.name}", objects, crds, env_ok, values)
            print(f"ok   overlay {overlay.name}: {len(objects)} objects: {', '.join(sorted(o['kind'] for o in objects))}")
            # kustomize may leave the chart it inflated beside the overlay.
            for leftover in ("charts",):
                if (overlay / leftover).exists():
                    fail(f"overlay {overlay.name}: kustomize left {overlay / leftover}")


# Accepted checkov findings, each with its reason.
CHECKOV_ACCEPTED = {
    # CPU limits throttle a latency-sensitive socket server under bursts (CFS
    # quota); the pods request CPU and have memory limits instead.
    "CKV_K8S_11": "CPU limits",
    # Releases pin an immutable tag (image.tag); a digest can be given as the
    # tag's suffix when wanted. IfNotPresent follows from immutable tags.
    "CKV_K8S_43": "image digest",
    "CKV_K8S_15": "pull policy Always",
    # Secrets as env are the default for simplicity; secrets.mountAsFiles
    # switches to *_FILE. The CNPG pooler URL and the test pod's token
    # minting need env (Kubernetes composes $(VAR) only from env).
    "CKV_K8S_35": "secrets as env",
    # The helm test pod runs once and exits: probes make no sense there.
    "CKV_K8S_8": "liveness probe (test pod)",
    "CKV_K8S_9": "readiness probe (test pod)",
}


def security_scan(chart, sets: dict) -> None:
    """checkov over every rendered value set; only CHECKOV_ACCEPTED may fail."""
    checkov = pathlib.Path(sys.executable).parent / "checkov"
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, values) in enumerate(sets.items()):
            rendered = chart.render(values, name="chat", namespace="chat", is_install=True)
            docs = "\n---\n".join(t for p, t in sorted(rendered.items()) if not p.endswith("NOTES.txt"))
            pathlib.Path(tmp, f"set{i}.yaml").write_text(docs)
        run = subprocess.run([checkov, "-d", tmp, "--framework", "kubernetes", "--quiet", "--compact",
                              "--output", "json", "--skip-check", ",".join(CHECKOV_ACCEPTED)],
                             capture_output=True, text=True)
        try:
            report = json.loads(run.stdout)
        except json.JSONDecodeError:
            fail(f"checkov did not run: {run.stderr[-2000:]}")
            return
        reports = report if isinstance(report, list) else [report]
        failed = [f for r in reports for f in r.get("results", {}).get("failed_checks", [])]
        passed = sum(r.get("summary", {}).get("passed", 0) for r in reports)
        for finding in failed:
            fail(f"checkov {finding['check_id']} {finding['check_name']}: {finding['resource']}")
        if not failed:
            print(f"ok   checkov: {passed} checks passed, accepted: {', '.join(CHECKOV_ACCEPTED.values())}")


def overlay_values(overlay: pathlib.Path) -> dict:
    spec = yaml.safe_load((overlay / "kustomization.yaml").read_text())["helmCharts"][0]
    merged: dict = {}
    for name in [spec["valuesFile"], *spec.get("additionalValuesFiles", [])]:
        merged = deep_merge(merged, yaml.safe_load((overlay / name).read_text()) or {})
    return merged


def main() -> int:
    chart = helm.Chart.load(str(CHART))
    schema = json.loads((CHART / "values.schema.json").read_text())
    crds, env_ok = load_crds(), binary_env_vars()
    print(f"Helm {helm.helm_sdk_version()} (helm-python-sdk); {len(crds)} CRD versions; Kubernetes {KUBE_VERSION} schemas")

    sets = {"defaults (+ required secrets)": SECRETS}
    for path in sorted((ROOT / "deploy" / "examples").glob("*.yaml")):
        sets[f"example {path.name}"] = yaml.safe_load(path.read_text())
    sets["secrets as files"] = deep_merge(SECRETS, {"secrets": {"mountAsFiles": True}})
    sets["KEDA instead of HPA, CNPG without pooler, standalone Redis"] = deep_merge(
        {"secrets": {"jwtSecret": "s"}},
        {"autoscaling": {"enabled": False}, "keda": {"enabled": True},
         "postgresql": {"cnpg": {"enabled": True}}, "redis": {"operator": {"enabled": True}}},
    )
    sets["standalone Redis with the image's own config"] = deep_merge(
        sets["KEDA instead of HPA, CNPG without pooler, standalone Redis"],
        {"redis": {"operator": {"config": ""}}},
    )
    rendered = {label: render_set(chart, label, values, crds, env_ok, schema) for label, values in sets.items()}

    expect_objects("defaults", rendered["defaults (+ required secrets)"],
                   {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceAccount",
                    "NetworkPolicy", "Secret", "Job", "Pod", "ConfigMap"}, {"ScaledObject", "Cluster"})
    full = rendered["example operators.yaml"]
    expect_objects("operators", full,
                   {"Cluster", "Pooler", "RedisReplication", "RedisSentinel", "ScaledObject", "ServiceMonitor",
                    "PrometheusRule", "OpenTelemetryCollector", "Ingress"}, {"HorizontalPodAutoscaler", "Secret"})
    expect_objects("KEDA", rendered["KEDA instead of HPA, CNPG without pooler, standalone Redis"],
                   {"ScaledObject", "Cluster", "Redis"}, {"HorizontalPodAutoscaler", "Pooler"})
    # Each Redis server the operator makes includes the chart's config, unless
    # it is emptied.
    for label, kind, included in (
        ("example operators.yaml", "RedisReplication", True),
        ("KEDA instead of HPA, CNPG without pooler, standalone Redis", "Redis", True),
        ("standalone Redis with the image's own config", "Redis", False),
    ):
        objects = rendered[label]
        server = next(o for o in objects if o["kind"] == kind)
        ref = server["spec"].get("redisConfig", {}).get("additionalRedisConfig")
        maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
        conf = maps[ref]["data"].get("redis-additional.conf", "") if ref in maps else None
        if included and (conf is None or 'save ""' not in conf.splitlines()):
            fail(f"{label}: the {kind} does not include the chart's Redis config ({ref!r})")
        if not included and (ref is not None or any(n.endswith("-redis-config") for n in maps)):
            fail(f"{label}: an empty redis.operator.config still made or referenced a ConfigMap")
    dashboards = [o for o in full if o["kind"] == "ConfigMap" and o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    source = json.loads((ROOT / "deploy" / "grafana" / "chat-service.json").read_text())
    if len(dashboards) != 1 or json.loads(dashboards[0]["data"]["chat-service.json"]) != source:
        fail("the dashboard ConfigMap does not carry deploy/grafana/chat-service.json")
    rules = [o for o in full if o["kind"] == "PrometheusRule"][0]
    exported = set(re.findall(r"`(chat_[a-z_]+)`", (ROOT / "docs" / "observability.md").read_text()))
    for group in rules["spec"]["groups"]:
        for rule in group["rules"]:
            for name in re.findall(r"\b(chat_[a-z_]+?)(?:_bucket|_count|_sum)?\b", rule["expr"]):
                if name not in exported:
                    fail(f"alert {rule['alert']} uses {name}, not in docs/observability.md")

    # Wrong values must be rejected (by the schema, or by the templates).
    wrong = {
        "unknown top-level key": {"replicas": 3},
        "unknown nested key": {"config": {"shutdownGrace": "10s"}},
        "replicaCount as a string": {"replicaCount": "2"},
        "log format outside the enum": {"config": {"logFormat": "xml"}},
        "JWT algorithm outside the enum": {"config": {"jwtAlgorithm": "RS256"}},
        "duration without a unit": {"config": {"idleTimeout": "60"}},
        "SQLite URL in cluster mode": {"secrets": {"databaseUrl": "sqlite://chat.db"}},
        "KEDA and HPA together": {"keda": {"enabled": True}, "autoscaling": {"enabled": True}},
        "no JWT secret": {"secrets": {"jwtSecret": ""}},
        "pooler without its cluster": {"postgresql": {"cnpg": {"pooler": {"enabled": True}}}},
        "Redis mode outside the enum": {"redis": {"operator": {"mode": "cluster"}}},
        "cache below the resume window": {"config": {"cacheRecentMessages": 100}},
    }
    for label, bad in wrong.items():
        values = deep_merge(SECRETS, bad)
        try:
            chart.validate_schema(chart.merge_values(values))
            chart.render(values, name="chat", namespace="chat", is_install=True)
        except helm.HelmError:
            print(f"ok   rejected: {label}")
        else:
            fail(f"accepted wrong values: {label}")

    binaries_check(chart, sets, crds, env_ok)
    security_scan(chart, sets)
    roundtrip()

    if failures:
        print(f"\n{len(failures)} failure(s)")
        return 1
    print("\nall chart checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
