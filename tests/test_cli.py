"""The `lambent` command: serving, the operator key, and the API tour from a terminal."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.support import LAMBENT, Server, create_tenant, start_server


def run_cli(
    server: Server, key: str, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LAMBENT_URL": server.base_url, "LAMBENT_API_KEY": key, "COLUMNS": "200"}
    result = subprocess.run(
        [str(LAMBENT), *args], env=env, capture_output=True, text=True, timeout=120
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_serve_generates_an_operator_key_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = start_server(data_dir)
    try:
        match = re.search(r"^\s+(lmbop_\S+)$", first.log(), re.MULTILINE)
        assert match, first.log()
        key = match.group(1)
        response = httpx.get(
            f"{first.base_url}/v1/tenants", headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200
    finally:
        first.stop()

    second = start_server(data_dir)
    try:
        assert "lmbop_" not in second.log()
        response = httpx.get(
            f"{second.base_url}/v1/tenants", headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200
        assert key not in (data_dir / "lambent.db").read_bytes().decode(errors="replace")
    finally:
        second.stop()


def test_configured_operator_key_replaces_a_generated_one(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = start_server(data_dir)
    first.stop()
    generated = re.search(r"^\s+(lmbop_\S+)$", first.log(), re.MULTILINE).group(1)  # type: ignore[union-attr]

    second = start_server(data_dir, admin_key="my-chosen-operator-key")
    try:
        with httpx.Client(base_url=second.base_url) as http:
            chosen = http.get(
                "/v1/tenants", headers={"Authorization": "Bearer my-chosen-operator-key"}
            )
            old = http.get("/v1/tenants", headers={"Authorization": f"Bearer {generated}"})
        assert chosen.status_code == 200
        assert old.status_code == 401
    finally:
        second.stop()


def test_cli_tour_deploys_invokes_and_reports_usage(server: Server, tmp_path: Path) -> None:
    created = json.loads(
        run_cli(server, server.admin_key, "tenants", "create", "cli-tour-" + server.database).stdout
    )
    key = created["api_key"]
    source = tmp_path / "src"
    source.mkdir()
    (source / "app.py").write_text(
        "import os\ndef handler(event, context):\n"
        "    print('greeting', event['name'])\n"
        "    return {'hello': event['name'], 'color': os.environ['COLOR']}\n"
    )

    deployed = run_cli(
        server,
        key,
        "functions",
        "deploy",
        "greeter",
        "--dir",
        str(source),
        "--memory",
        "256",
        "--env",
        "COLOR=green",
    )
    assert json.loads(deployed.stdout)["memory_mb"] == 256

    invoked = run_cli(server, key, "invoke", "greeter", "--payload", '{"name": "ada"}', "--logs")
    assert json.loads(invoked.stdout) == {"hello": "ada", "color": "green"}
    assert "greeting ada" in invoked.stderr and "REPORT RequestId" in invoked.stderr

    listed = run_cli(server, key, "functions", "list")
    assert "greeter" in listed.stdout
    usage = run_cli(server, key, "usage")
    assert "greeter" in usage.stdout and "total" in usage.stdout

    missing = run_cli(server, key, "invoke", "nope", check=False)
    assert missing.returncode == 1
    assert "ResourceNotFound" in missing.stderr


def test_a_stopping_server_finishes_its_in_flight_invocations(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", admin_key="graceful-operator-key")
    try:
        tenant = create_tenant(server)
        tenant.deploy(
            "slow",
            "import time\ndef handler(event, context):\n    time.sleep(2)\n    return 'done'\n",
            timeout_s=10,
        )
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(tenant.invoke, "slow")
            time.sleep(0.8)  # the invocation is under way
            server.process.send_signal(signal.SIGTERM)
            response = pending.result(timeout=30)

        assert response.status_code == 200
        assert response.json() == "done"
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in server.log()
    finally:
        server.stop()
