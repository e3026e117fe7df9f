"""Fixtures of the SDK and contract tests: the real binary as a server, tokens,
the two documents, and a Python client generated from openapi.yaml.

Run through tests/sdk/run.sh, which installs the tools and builds the binary.
The binary is `CHAT_SERVICE_BIN` (default: target/debug/chat-service).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1].parent
SDK_DIR = Path(__file__).resolve().parent
BINARY = Path(os.environ.get("CHAT_SERVICE_BIN", ROOT / "target" / "debug" / "chat-service"))
SECRET = "sdk-tests-secret"
# The SDK's package name: the generator names it after its output folder.
SDK_PACKAGE = "chat_sdk"


@dataclass
class Server:
    """A running `chat-service serve` on a free loopback port."""

    base_url: str
    process: subprocess.Popen
    log: Path

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/v1"

    @property
    def ws_url(self) -> str:
        return "ws" + self.base_url.removeprefix("http")

    def token(self, sub: str, name: str | None = None, roles: tuple[str, ...] = (), ttl: str = "1h") -> str:
        return mint(sub, name, roles, ttl)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def mint(sub: str, name: str | None = None, roles: tuple[str, ...] = (), ttl: str = "1h") -> str:
    """A token from the binary's own `token` command, with the tests' secret."""
    args = [str(BINARY), "token", "--sub", sub, "--ttl", ttl]
    if name is not None:
        args += ["--name", name]
    for role in roles:
        args += ["--role", role]
    out = subprocess.run(args, env=_server_env(), check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _server_env(**extra: str) -> dict[str, str]:
    # Only what the service needs: an inherited DATABASE_URL or REDIS_URL
    # must not point the test server at a real database.
    env = {key: os.environ[key] for key in ("PATH", "HOME", "TMPDIR") if key in os.environ}
    env.update(JWT_SECRET=SECRET, LOG_FORMAT="json", RUST_LOG="info", **extra)
    return env


def start_server(workdir: Path, **settings: str) -> Server:
    """Starts the binary with a fresh SQLite file and waits for the JSON log
    line that announces the address."""
    if not BINARY.is_file():
        pytest.fail(f"{BINARY} is missing: run `cargo build` (tests/sdk/run.sh does)")
    log = workdir / "server.log"
    env = _server_env(DATABASE_URL=f"sqlite://{workdir / 'chat.db'}", **settings)
    with log.open("wb") as out:
        # The working directory is the temp dir, so no .env file is read.
        process = subprocess.Popen(
            [str(BINARY), "serve", "--listen", "127.0.0.1:0"],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            fields = record.get("fields", {})
            if fields.get("message") == "chat service listening":
                return Server(f"http://{fields['addr']}", process, log)
        if process.poll() is not None:
            pytest.fail(f"chat-service exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"chat-service did not report its address:\n{log.read_text(errors='replace')}")


def stop_server(server: Server) -> None:
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One server per test module, limits high enough not to get in the way
    (429 is still a documented answer)."""
    server = start_server(
        tmp_path_factory.mktemp("server"),
        REST_RATE_LIMIT="1000000",
        SEND_RATE_LIMIT="1000000",
        CONNECT_RATE_LIMIT="1000000",
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def openapi() -> dict:
    return yaml.safe_load((ROOT / "openapi.yaml").read_text())


@pytest.fixture(scope="session")
def asyncapi() -> dict:
    return yaml.safe_load((ROOT / "asyncapi.yaml").read_text())


@pytest.fixture(scope="session")
def sdk():
    """The Python client generated from openapi.yaml by openapi-python-client,
    in a temp directory (generated code is never committed)."""
    out = Path(tempfile.mkdtemp(prefix="chat-sdk-"))
    generator = Path(sys.executable).with_name("openapi-python-client")
    result = subprocess.run(
        [
            str(generator),
            "generate",
            "--path",
            str(ROOT / "openapi.yaml"),
            "--meta",
            "none",
            "--output-path",
            str(out / SDK_PACKAGE),
            "--config",
            str(SDK_DIR / "generator.yaml"),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    report = result.stdout + result.stderr
    # The generator still exits 0 when it skipped parts of the document.
    if result.returncode != 0 or "Warning" in report or "Error" in report:
        pytest.fail(f"openapi-python-client could not generate a complete client:\n{report}")
    sys.path.insert(0, str(out))
    return importlib.import_module(SDK_PACKAGE)
