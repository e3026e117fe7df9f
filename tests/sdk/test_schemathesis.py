"""Property-based testing of the running server against openapi.yaml with
schemathesis. The run's parameters are in tests/sdk/schemathesis.toml."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, SDK_DIR

# A hard bound over the configured number of examples.
TIMEOUT_SECONDS = 240


def test_schemathesis_finds_no_server_error_and_no_response_outside_the_spec(server, tmp_path):
    schemathesis = Path(sys.executable).with_name("schemathesis")
    command = [
        str(schemathesis),
        "--config-file",
        str(SDK_DIR / "schemathesis.toml"),
        "--no-color",
        "run",
        str(ROOT / "openapi.yaml"),
        "--url",
        server.api_url,
    ]
    # Extra arguments, e.g. CHAT_SDK_SCHEMATHESIS_ARGS="--seed 7 --max-examples 500".
    command += os.environ.get("CHAT_SDK_SCHEMATHESIS_ARGS", "").split()
    env = {**os.environ, "CHAT_SDK_TOKEN": server.token("schemathesis", "Fuzzer", roles=("admin",), ttl="1h")}
    # The working directory is a temp dir: nothing is written into the repository.
    result = subprocess.run(
        command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS
    )
    report = result.stdout + result.stderr
    print(report[-3000:])
    assert result.returncode == 0, (
        f"schemathesis failed:\n{report}\n--- server log (tail) ---\n{server.log_text()[-5000:]}"
    )
    assert "No issues found" in report or " passed" in report, report
