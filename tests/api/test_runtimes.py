"""The `provided` runtime: a package's own bootstrap speaks the Runtime API over TCP."""

from __future__ import annotations

import pytest

from tests.support import Tenant

pytestmark = pytest.mark.both_sandboxes

SHELL_BOOTSTRAP = r"""#!/bin/sh
# A custom runtime in plain shell: fetch an event, answer with it wrapped.
set -eu
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
echo "shell runtime starting for $_HANDLER"
while true; do
    HEADERS=$(mktemp)
    EVENT=$(curl -sS -D "$HEADERS" "$API/invocation/next")
    REQUEST_ID=$(grep -i '^Lambda-Runtime-Aws-Request-Id:' "$HEADERS" | tr -d '\r' | cut -d' ' -f2)
    DEADLINE=$(grep -i '^Lambda-Runtime-Deadline-Ms:' "$HEADERS" | tr -d '\r' | cut -d' ' -f2)
    echo "got $REQUEST_ID"
    curl -sS -X POST "$API/invocation/$REQUEST_ID/response" \
        -d "{\"runtime\": \"shell\", \"event\": $EVENT, \"deadline\": $DEADLINE}" > /dev/null
    rm -f "$HEADERS"
done
"""

PYTHON_BOOTSTRAP = r"""#!/usr/bin/python3
import json, os, urllib.request

API = f"http://{os.environ['AWS_LAMBDA_RUNTIME_API']}/2018-06-01/runtime"

while True:
    with urllib.request.urlopen(f"{API}/invocation/next") as response:
        request_id = response.headers["Lambda-Runtime-Aws-Request-Id"]
        arn = response.headers["Lambda-Runtime-Invoked-Function-Arn"]
        event = json.loads(response.read())
    if event.get("fail"):
        body = json.dumps({"errorMessage": "asked to fail", "errorType": "CustomError"}).encode()
        request = urllib.request.Request(
            f"{API}/invocation/{request_id}/error", data=body, method="POST",
            headers={"Lambda-Runtime-Function-Error-Type": "CustomError"},
        )
    else:
        body = json.dumps({"runtime": "python", "arn": arn, "event": event}).encode()
        request = urllib.request.Request(
            f"{API}/invocation/{request_id}/response", data=body, method="POST"
        )
    urllib.request.urlopen(request).read()
"""

INIT_FAILING_BOOTSTRAP = r"""#!/usr/bin/python3
import json, os, urllib.request

API = f"http://{os.environ['AWS_LAMBDA_RUNTIME_API']}/2018-06-01/runtime"
body = json.dumps({"errorMessage": "config missing", "errorType": "Runtime.ConfigError"})
request = urllib.request.Request(
    f"{API}/init/error", data=body.encode(), method="POST",
    headers={"Lambda-Runtime-Function-Error-Type": "Runtime.ConfigError"},
)
urllib.request.urlopen(request).read()
"""


def test_shell_bootstrap_serves_invocations(tenant: Tenant) -> None:
    tenant.deploy(
        "shell",
        files={"bootstrap": SHELL_BOOTSTRAP},
        modes={"bootstrap": 0o755},
        runtime="provided",
        handler="function.handler",
    )

    first = tenant.invoke("shell", {"n": 1})
    second = tenant.invoke("shell", {"n": 2})

    assert first.status_code == 200, first.text
    assert first.json()["runtime"] == "shell"
    assert first.json()["event"] == {"n": 1}
    assert second.json()["event"] == {"n": 2}
    assert first.json()["deadline"] > 0
    logs = tenant.invocation(first.headers["x-request-id"])["logs"]
    assert "shell runtime starting for function.handler" in logs
    assert f"got {first.headers['x-request-id']}" in logs
    assert tenant.invocation(second.headers["x-request-id"])["cold_start"] is False


def test_python_bootstrap_serves_responses_and_errors(tenant: Tenant) -> None:
    fn = tenant.deploy(
        "custom",
        files={"bootstrap": PYTHON_BOOTSTRAP},
        runtime="provided",
        handler="unused",
    )

    ok = tenant.invoke("custom", {"x": 1})
    failed = tenant.invoke("custom", {"fail": True})

    assert ok.json() == {"runtime": "python", "arn": fn["arn"], "event": {"x": 1}}
    assert failed.headers["x-function-error"] == "Unhandled"
    assert failed.json()["errorType"] == "CustomError"


def test_bootstrap_init_error_is_reported(tenant: Tenant) -> None:
    tenant.deploy(
        "initfail", files={"bootstrap": INIT_FAILING_BOOTSTRAP}, runtime="provided", handler="x"
    )

    response = tenant.invoke("initfail")

    assert response.headers["x-function-error"] == "Unhandled"
    assert response.json()["errorType"] == "Runtime.ConfigError"
    assert tenant.invocation(response.headers["x-request-id"])["status"] == "error"


def test_bootstrap_that_exits_answers_exit_error(tenant: Tenant) -> None:
    tenant.deploy(
        "exits",
        files={"bootstrap": "#!/bin/sh\necho bye\nexit 3\n"},
        runtime="provided",
        handler="x",
    )

    response = tenant.invoke("exits")

    assert response.json()["errorType"] == "Runtime.ExitError"
    assert "bye" in tenant.invocation(response.headers["x-request-id"])["logs"]
