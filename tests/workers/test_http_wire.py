"""The worker API's wire format: what the control plane sends is what the worker reads."""

from __future__ import annotations

from multidict import CIMultiDict

from workers import http_api
from workers.protocol import InvocationStatus, InvokeRequest, InvokeResult, StartResult


def test_an_invocation_request_survives_the_headers() -> None:
    request = InvokeRequest("req-1", b'{"a": 1}', 30, "arn:aws:lambda:local:1:function:f", "Root=1")

    read = http_api.invoke_request(CIMultiDict(http_api.invoke_headers(request)), request.payload)

    assert read == request


def test_a_result_survives_with_its_logs_and_any_error_type() -> None:
    result = InvokeResult(
        request_id="req-1",
        status=InvocationStatus.ERROR,
        body=b'{"errorType": "\xd0\x9e\xd1\x88\xd0\xb8\xd0\xb1\xd0\xba\xd0\xb0"}',
        error_type="Ошибка: with spaces",
        duration_ns=1234,
        max_memory_used_mb=17,
        logs="line one\nстрока два\n",
        instance_alive=False,
        response_too_large=True,
    )
    headers = http_api.result_headers(result)

    assert all(value.isascii() for value in headers.values())
    content = result.body + result.logs.encode()
    assert http_api.invoke_result("req-1", CIMultiDict(headers), content) == result


def test_a_start_result_with_an_init_error_survives_json() -> None:
    start = StartResult("i-1", 5, "init logs", 12, "Runtime.ExitError", b"\x00\xffbody")

    assert http_api.start_result(http_api.start_result_json(start)) == start


def test_the_reservation_header_is_sequence_then_reserved_then_idle_megabytes() -> None:
    assert http_api.parse_reserved("42:1536:256") == (42, 1536, 256)
    assert http_api.parse_reserved("42:1536") == (42, 1536, 0)
