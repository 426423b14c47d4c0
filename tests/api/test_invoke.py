"""Invoking functions through the HTTP API: results, errors, limits and logs."""

from __future__ import annotations

import base64
import json
import time

import pytest

from tests.support import Tenant, make_zip

pytestmark = pytest.mark.both_sandboxes

ECHO = """
import os
import uuid

INSTANCE = uuid.uuid4().hex
COUNTER = {"n": 0}
print("module initialised")


def handler(event, context):
    COUNTER["n"] += 1
    print("handling", event)
    return {
        "event": event,
        "calls": COUNTER["n"],
        "instance": INSTANCE,
        "request_id": context.aws_request_id,
        "function_name": context.function_name,
        "function_version": context.function_version,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "invoked_function_arn": context.invoked_function_arn,
        "log_group_name": context.log_group_name,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "env": {k: v for k, v in os.environ.items()},
    }
"""


def test_invoke_returns_the_handlers_value_with_a_request_id(tenant: Tenant) -> None:
    tenant.deploy("echo", ECHO)

    response = tenant.invoke("echo", {"hello": "world"})

    assert response.status_code == 200
    assert "x-function-error" not in response.headers
    body = response.json()
    assert body["event"] == {"hello": "world"}
    assert body["request_id"] == response.headers["x-request-id"]


def test_context_carries_lambdas_fields(tenant: Tenant) -> None:
    fn = tenant.deploy("ctx", ECHO, memory_mb=256, timeout_s=7)

    body = tenant.invoke("ctx").json()

    assert body["function_name"] == "ctx"
    assert body["function_version"] == "$LATEST"
    assert int(body["memory_limit_in_mb"]) == 256
    assert body["invoked_function_arn"] == fn["arn"]
    assert body["log_group_name"] == "/aws/lambda/ctx"
    assert 5000 < body["remaining_ms"] <= 7000


def test_function_environment_is_set_and_platform_settings_are_not(tenant: Tenant) -> None:
    tenant.deploy("env", ECHO, environment={"GREETING": "hi", "COLOR": "blue"})

    env = tenant.invoke("env").json()["env"]

    assert env["GREETING"] == "hi" and env["COLOR"] == "blue"
    assert env["_HANDLER"] == "app.handler"
    assert env["AWS_LAMBDA_FUNCTION_NAME"] == "env"
    assert env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] == "128"
    assert env["LAMBDA_TASK_ROOT"] == "/var/task"
    host, _, port = env["AWS_LAMBDA_RUNTIME_API"].partition(":")
    assert host == "127.0.0.1" and port.isdigit()
    leaked = [k for k in env if k.startswith("LAMBENT_") and k != "LAMBENT_RUNTIME_SOCKET"]
    assert leaked == []
    assert tenant.server.admin_key not in json.dumps(env)


def test_second_call_is_warm_and_module_code_ran_once(tenant: Tenant) -> None:
    tenant.deploy("warm", ECHO)

    first = tenant.invoke("warm")
    second = tenant.invoke("warm")

    assert second.json()["instance"] == first.json()["instance"]
    assert second.json()["calls"] == 2
    cold = tenant.invocation(first.headers["x-request-id"])
    warm = tenant.invocation(second.headers["x-request-id"])
    assert cold["cold_start"] is True and cold["init_duration_ms"] > 0
    assert warm["cold_start"] is False and warm["init_duration_ms"] is None
    assert cold["logs"].count("module initialised") == 1
    assert "module initialised" not in warm["logs"]


def test_empty_body_is_an_empty_event(tenant: Tenant) -> None:
    tenant.deploy("empty", ECHO)

    response = tenant.invoke("empty", content=b"")

    assert response.status_code == 200
    assert response.json()["event"] == {}


def test_body_that_is_not_json_is_rejected(tenant: Tenant) -> None:
    tenant.deploy("badjson", ECHO)

    response = tenant.invoke(
        "badjson", content=b"{not json", headers={"content-type": "text/plain"}
    )

    assert response.status_code == 400
    assert response.json()["type"] == "InvalidRequestContentException"


def test_handler_exception_is_an_unhandled_error_without_platform_frames(tenant: Tenant) -> None:
    tenant.deploy(
        "boom",
        "def helper():\n    raise ValueError('bad input')\n\n"
        "def handler(event, context):\n    return helper()\n",
    )

    response = tenant.invoke("boom")

    assert response.status_code == 200
    assert response.headers["x-function-error"] == "Unhandled"
    error = response.json()
    assert error["errorType"] == "ValueError"
    assert error["errorMessage"] == "bad input"
    trace = "\n".join(error["stackTrace"])
    assert "app.py" in trace and "helper" in trace
    assert "bootstrap" not in trace and "/var/runtime" not in trace
    record = tenant.invocation(response.headers["x-request-id"])
    assert record["status"] == "error" and record["error_type"] == "ValueError"


def test_error_does_not_discard_the_instance(tenant: Tenant) -> None:
    tenant.deploy(
        "flaky",
        "import uuid\nINSTANCE = uuid.uuid4().hex\n"
        "def handler(event, context):\n"
        "    if event.get('fail'):\n        raise RuntimeError('asked to')\n"
        "    return INSTANCE\n",
    )

    instance = tenant.invoke("flaky").json()
    assert tenant.invoke("flaky", {"fail": True}).headers["x-function-error"] == "Unhandled"
    assert tenant.invoke("flaky").json() == instance


def test_timeout_answers_sandbox_timedout_near_the_limit(tenant: Tenant) -> None:
    tenant.deploy(
        "slow",
        "import time, uuid\nINSTANCE = uuid.uuid4().hex\n"
        "def handler(event, context):\n"
        "    if event.get('sleep'):\n        time.sleep(30)\n"
        "    return INSTANCE\n",
        timeout_s=1,
    )
    first_instance = tenant.invoke("slow").json()

    started = time.monotonic()
    response = tenant.invoke("slow", {"sleep": True})
    elapsed = time.monotonic() - started

    assert response.headers["x-function-error"] == "Unhandled"
    error = response.json()
    assert error["errorType"] == "Sandbox.Timedout"
    assert "timed out after 1.00 seconds" in error["errorMessage"]
    # Generous bound: the limit is 1 s; the answer must not wait for the 30 s sleep.
    assert elapsed < 5
    record = tenant.invocation(response.headers["x-request-id"])
    assert record["status"] == "timeout"
    assert record["billed_duration_ms"] >= 1000
    assert "Status: timeout" in record["logs"]
    # The timed-out instance was discarded: the next call starts a new one.
    assert tenant.invoke("slow").json() != first_instance


def test_memory_limit_kill_answers_out_of_memory(tenant: Tenant) -> None:
    tenant.deploy(
        "hog",
        "def handler(event, context):\n"
        "    blocks = []\n"
        "    while True:\n        blocks.append('x' * (16 * 1024 * 1024))\n",
        memory_mb=128,
        timeout_s=20,
    )

    response = tenant.invoke("hog")

    assert response.headers["x-function-error"] == "Unhandled"
    assert response.json()["errorType"] == "Runtime.OutOfMemory"
    record = tenant.invocation(response.headers["x-request-id"])
    assert record["max_memory_used_mb"] >= 100
    assert tenant.invoke("hog", content=b"", headers={}).json()["errorType"] == (
        "Runtime.OutOfMemory"
    )


def test_import_error_answers_import_module_error(tenant: Tenant) -> None:
    tenant.deploy("imports", "import not_a_real_module\n\ndef handler(e, c):\n    return 1\n")

    response = tenant.invoke("imports")

    assert response.headers["x-function-error"] == "Unhandled"
    error = response.json()
    assert error["errorType"] == "Runtime.ImportModuleError"
    assert "Unable to import module 'app'" in error["errorMessage"]
    assert "not_a_real_module" in error["errorMessage"]


def test_missing_handler_function_answers_handler_not_found(tenant: Tenant) -> None:
    tenant.deploy("nohandler", "def other(e, c):\n    return 1\n")

    error = tenant.invoke("nohandler").json()

    assert error["errorType"] == "Runtime.HandlerNotFound"
    assert "handler" in error["errorMessage"]


def test_syntax_error_answers_user_code_syntax_error(tenant: Tenant) -> None:
    tenant.deploy("syntax", "def handler(event, context)\n    return 1\n")

    error = tenant.invoke("syntax").json()

    assert error["errorType"] == "Runtime.UserCodeSyntaxError"
    assert "app" in error["errorMessage"]


def test_unserialisable_result_answers_marshal_error(tenant: Tenant) -> None:
    tenant.deploy("marshal", "def handler(e, c):\n    return {1, 2}\n")

    error = tenant.invoke("marshal").json()

    assert error["errorType"] == "Runtime.MarshalError"


def test_event_over_six_megabytes_is_413(tenant: Tenant) -> None:
    tenant.deploy("big", ECHO)
    payload = json.dumps({"data": "x" * (6 * 1024 * 1024)}).encode()

    response = tenant.invoke("big", content=payload, headers={"content-type": "application/json"})

    assert response.status_code == 413
    assert response.json()["type"] == "RequestTooLargeException"


def test_response_over_six_megabytes_is_413(tenant: Tenant) -> None:
    tenant.deploy("bigout", "def handler(e, c):\n    return 'x' * (7 * 1024 * 1024)\n")

    response = tenant.invoke("bigout")

    assert response.status_code == 413
    assert response.json()["type"] == "ResponseTooLargeException"
    record = tenant.invocation(response.headers["x-request-id"])
    assert record["error_type"] == "Function.ResponseSizeTooLarge"


def test_logs_hold_start_end_and_report_lines(tenant: Tenant) -> None:
    tenant.deploy("logs", "def handler(e, c):\n    print('line one')\n    print('line two')\n")

    response = tenant.invoke("logs")
    request_id = response.headers["x-request-id"]
    record = tenant.invocation(request_id)
    lines = record["logs"].splitlines()

    start = lines.index(f"START RequestId: {request_id} Version: $LATEST")
    end = lines.index(f"END RequestId: {request_id}")
    assert lines[start + 1 : end] == ["line one", "line two"]
    report = lines[end + 1]
    assert report.startswith(f"REPORT RequestId: {request_id}\tDuration: ")
    for field in (
        "Billed Duration: ",
        "Memory Size: 128 MB",
        "Max Memory Used: ",
        "Init Duration: ",
    ):
        assert field in report
    assert f"Billed Duration: {record['billed_duration_ms']} ms" in report


def test_logs_are_capped_per_invocation(tenant: Tenant) -> None:
    tenant.deploy(
        "chatty",
        "def handler(e, c):\n    for i in range(200000):\n        print('x' * 99)\n",
        timeout_s=30,
    )

    response = tenant.invoke("chatty")

    assert response.status_code == 200
    logs = tenant.invocation(response.headers["x-request-id"])["logs"]
    assert len(logs) < 300 * 1024
    assert "log output truncated" in logs
    assert "REPORT RequestId" in logs


def test_get_invocation_has_every_field(tenant: Tenant) -> None:
    tenant.deploy("fields", ECHO, memory_mb=512)

    request_id = tenant.invoke("fields").headers["x-request-id"]
    record = tenant.invocation(request_id)

    assert record["request_id"] == request_id
    assert record["function"] == "fields"
    assert record["status"] == "success"
    assert record["memory_mb"] == 512
    assert record["duration_ms"] > 0
    assert record["billed_duration_ms"] >= record["duration_ms"]
    assert record["billed_duration_ms"] - record["duration_ms"] < 1
    assert 0 < record["max_memory_used_mb"] <= 512


def test_function_invocations_lists_recent_first(tenant: Tenant) -> None:
    tenant.deploy("listed", ECHO)
    ids = [tenant.invoke("listed").headers["x-request-id"] for _ in range(3)]

    listed = tenant.http.get("/v1/functions/listed/invocations").json()["invocations"]

    assert [i["request_id"] for i in listed] == ids[::-1]


def test_invoking_a_missing_function_is_404(tenant: Tenant) -> None:
    response = tenant.invoke("does-not-exist")

    assert response.status_code == 404
    assert response.json()["type"] == "ResourceNotFound"


def test_code_update_takes_effect_on_next_invoke(tenant: Tenant) -> None:
    tenant.deploy("versioned", "def handler(e, c):\n    return 'one'\n")
    assert tenant.invoke("versioned").json() == "one"

    package = make_zip({"app.py": "def handler(e, c):\n    return 'two'\n"})
    response = tenant.http.put(
        "/v1/functions/versioned/code",
        json={"zip_base64": base64.b64encode(package).decode()},
    )
    assert response.status_code == 200, response.text

    assert tenant.invoke("versioned").json() == "two"


def test_root_logger_writes_lambda_style_lines_with_the_request_id(tenant: Tenant) -> None:
    tenant.deploy(
        "logger",
        "import logging\nlogger = logging.getLogger()\nlogger.setLevel(logging.INFO)\n"
        "def handler(e, c):\n    logger.info('processing %s', e['id'])\n",
    )

    response = tenant.invoke("logger", {"id": 42})
    request_id = response.headers["x-request-id"]
    logs = tenant.invocation(request_id)["logs"]

    line = next(x for x in logs.splitlines() if x.startswith("[INFO]"))
    level, timestamp, logged_id, message = line.split("\t")
    assert timestamp.endswith("Z") and logged_id == request_id and message == "processing 42"
