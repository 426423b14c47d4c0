"""Cold starts in pre-started sandboxes, through the HTTP API.

The session's server keeps the default pool of pre-started sandboxes, so a function's first
invocation takes one over; a server of its own checks that without a pool, starts are fresh.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    Server,
    Tenant,
    create_tenant,
    require_docker,
    start_server,
    wait_for_prestarted,
)

pytestmark = pytest.mark.both_sandboxes


@pytest.fixture
def tenant(tenant: Tenant) -> Tenant:
    """A tenant of a server whose pool has a sandbox of every runtime free."""
    wait_for_prestarted(tenant.server)
    return tenant


ECHO = """
import os
import uuid

INSTANCE = uuid.uuid4().hex
print("module initialised")


def handler(event, context):
    seen = os.path.exists("/tmp/marker")
    with open("/tmp/marker", "w") as marker:
        marker.write(context.function_name)
    return {
        "instance": INSTANCE,
        "marker_was_there": seen,
        "function_name": context.function_name,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "invoked_function_arn": context.invoked_function_arn,
        "log_stream_name": context.log_stream_name,
        "env": dict(os.environ),
    }
"""

SHELL_BOOTSTRAP = r"""#!/bin/sh
set -eu
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
echo "shell runtime starting for $_HANDLER"
while true; do
    HEADERS=$(mktemp)
    curl -sS -D "$HEADERS" -o /dev/null "$API/invocation/next"
    REQUEST_ID=$(grep -i '^Lambda-Runtime-Aws-Request-Id:' "$HEADERS" | tr -d '\r' | cut -d' ' -f2)
    curl -sS -X POST "$API/invocation/$REQUEST_ID/response" \
        -d "{\"function\": \"$AWS_LAMBDA_FUNCTION_NAME\", \"color\": \"$COLOR\"}" > /dev/null
    rm -f "$HEADERS"
done
"""


def record(tenant: Tenant, response) -> dict:  # type: ignore[no-untyped-def]
    return tenant.invocation(response.headers["x-request-id"])


def test_first_invocation_takes_over_a_prestarted_sandbox(tenant: Tenant) -> None:
    tenant.deploy("pooled", ECHO)

    first = tenant.invoke("pooled")
    second = tenant.invoke("pooled")

    assert first.status_code == 200, first.text
    cold, warm = record(tenant, first), record(tenant, second)
    assert cold["cold_start"] is True and cold["start_kind"] == "prestarted"
    assert cold["init_duration_ms"] > 0
    assert warm["cold_start"] is False and warm["start_kind"] is None
    assert second.json()["instance"] == first.json()["instance"]
    assert cold["logs"].count("module initialised") == 1
    assert "module initialised" not in warm["logs"]


def test_prestarted_instance_has_the_functions_environment_and_context(tenant: Tenant) -> None:
    fn = tenant.deploy("configured", ECHO, memory_mb=256, environment={"COLOR": "blue"})

    response = tenant.invoke("configured")

    assert record(tenant, response)["start_kind"] == "prestarted"
    body = response.json()
    assert body["function_name"] == "configured"
    assert int(body["memory_limit_in_mb"]) == 256
    assert body["invoked_function_arn"] == fn["arn"]
    env = body["env"]
    assert env["COLOR"] == "blue"
    assert env["_HANDLER"] == "app.handler"
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "configured"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "256"
    assert env["AWS_LAMBDA_INITIALIZATION_TYPE"] == "on-demand"
    assert env["AWS_LAMBDA_LOG_STREAM_NAME"] == body["log_stream_name"]
    leaked = [k for k in env if k.startswith("LAMBENT_") and k != "LAMBENT_RUNTIME_SOCKET"]
    assert leaked == []


def test_prestarted_instance_gets_the_functions_memory_limit(tenant: Tenant) -> None:
    # Pooled sandboxes wait at 128 MB; this one must be allowed its function's 512 MB.
    tenant.deploy(
        "roomy",
        "def handler(event, context):\n"
        "    block = bytearray(300 * 1024 * 1024)\n"
        "    return len(block) // (1024 * 1024)\n",
        memory_mb=512,
        timeout_s=10,
    )

    response = tenant.invoke("roomy")

    assert response.json() == 300, response.text
    assert record(tenant, response)["start_kind"] == "prestarted"


def test_each_tenant_gets_a_sandbox_of_its_own(tenant: Tenant, other_tenant: Tenant) -> None:
    tenant.deploy("first", ECHO, environment={"SECRET": "tenant-one"})
    other_tenant.deploy("second", ECHO)

    mine = tenant.invoke("first")
    wait_for_prestarted(tenant.server)
    theirs = other_tenant.invoke("second")

    assert record(tenant, mine)["start_kind"] == "prestarted"
    assert record(other_tenant, theirs)["start_kind"] == "prestarted"
    assert mine.json()["instance"] != theirs.json()["instance"]
    assert mine.json()["log_stream_name"] != theirs.json()["log_stream_name"]
    # Nothing of the first function reached the second's sandbox: a pooled one serves once.
    assert theirs.json()["marker_was_there"] is False
    assert "SECRET" not in theirs.json()["env"]
    assert theirs.json()["function_name"] == "second"


def test_provided_runtime_starts_from_the_pool(tenant: Tenant) -> None:
    tenant.deploy(
        "shell",
        files={"bootstrap": SHELL_BOOTSTRAP},
        modes={"bootstrap": 0o755},
        runtime="provided",
        handler="function.handler",
        environment={"COLOR": "green"},
    )

    response = tenant.invoke("shell")

    assert response.status_code == 200, response.text
    assert response.json() == {"function": "shell", "color": "green"}
    cold = record(tenant, response)
    assert cold["start_kind"] == "prestarted"
    assert "shell runtime starting for function.handler" in cold["logs"]


def test_import_error_in_a_prestarted_sandbox_answers_import_module_error(
    tenant: Tenant,
) -> None:
    tenant.deploy("broken", "import not_a_real_module\n\ndef handler(e, c):\n    return 1\n")

    response = tenant.invoke("broken")

    assert response.headers["x-function-error"] == "Unhandled"
    error = response.json()
    assert error["errorType"] == "Runtime.ImportModuleError"
    assert "not_a_real_module" in error["errorMessage"]
    failed = record(tenant, response)
    assert failed["status"] == "error" and failed["start_kind"] == "prestarted"


def test_a_function_setting_interpreter_variables_starts_fresh(tenant: Tenant) -> None:
    # Python reads PYTHON* variables when it starts, before a pooled interpreter is assigned.
    tenant.deploy(
        "flags",
        "import sys\ndef handler(e, c):\n    return sys.flags.dont_write_bytecode\n",
        environment={"PYTHONDONTWRITEBYTECODE": "1"},
    )

    response = tenant.invoke("flags")

    assert response.json() == 1
    assert record(tenant, response)["start_kind"] == "fresh"


@pytest.fixture(params=["process", "docker"])
def poolless_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    if request.param == "docker":
        require_docker()
    server = start_server(
        tmp_path / "data",
        admin_key="poolless-server-operator-key",
        env={"LAMBENT_PRESTART_POOL_SIZE": "0"},
        sandbox=request.param,
    )
    yield server
    server.stop()


def test_without_a_pool_cold_starts_are_fresh(poolless_server: Server) -> None:
    tenant = create_tenant(poolless_server)
    tenant.deploy("plain", ECHO)

    first = tenant.invoke("plain")
    second = tenant.invoke("plain")

    assert record(tenant, first)["start_kind"] == "fresh"
    assert record(tenant, second)["start_kind"] is None
    assert first.json()["env"]["AWS_LAMBDA_FUNCTION_NAME"] == "plain"
