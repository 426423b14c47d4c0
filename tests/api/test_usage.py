"""Usage reports through the HTTP API: requests, billed milliseconds and GB-seconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.support import Tenant

WORK = "def handler(event, context):\n    return sum(range(event.get('n', 1000)))\n"
FAILS = "def handler(event, context):\n    raise RuntimeError('no')\n"
MB_MS_PER_GB_SECOND = 1_024_000
EMPTY_TOTAL = {"requests": 0, "billed_ms": 0, "gb_seconds": 0.0}


def window_around_now() -> dict[str, str]:
    now = datetime.now(UTC)
    return {
        "start": (now - timedelta(hours=1)).isoformat(),
        "end": (now + timedelta(hours=1)).isoformat(),
    }


def usage(tenant: Tenant, **params: str) -> dict[str, Any]:
    response = tenant.http.get("/v1/usage", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def invoke_records(tenant: Tenant, name: str, times: int) -> list[dict[str, Any]]:
    """Invoke ``name`` a number of times; return the invocation records."""
    request_ids = [tenant.invoke(name).headers["x-request-id"] for _ in range(times)]
    return [tenant.invocation(request_id) for request_id in request_ids]


def expected_usage(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "requests": len(records),
        "billed_ms": sum(r["billed_duration_ms"] for r in records),
        "gb_seconds": sum(r["billed_duration_ms"] * r["memory_mb"] for r in records)
        / MB_MS_PER_GB_SECOND,
    }


def assert_usage_matches(reported: dict[str, Any], expected: dict[str, Any]) -> None:
    assert reported["requests"] == expected["requests"]
    assert reported["billed_ms"] == expected["billed_ms"]
    assert reported["gb_seconds"] == pytest.approx(expected["gb_seconds"], rel=0, abs=1e-9)


@pytest.fixture
def invoked(tenant: Tenant) -> dict[str, list[dict[str, Any]]]:
    """Two functions of different memory sizes, invoked 3 and 2 times: their records by name."""
    tenant.deploy("small", WORK, memory_mb=128)
    tenant.deploy("large", WORK, memory_mb=640)
    return {
        "small": invoke_records(tenant, "small", 3),
        "large": invoke_records(tenant, "large", 2),
    }


def test_usage_reports_each_functions_requests_billed_ms_and_gb_seconds(
    tenant: Tenant, invoked: dict[str, list[dict[str, Any]]]
) -> None:
    report = usage(tenant, **window_around_now())

    by_function = {f["function"]: f for f in report["functions"]}
    assert set(by_function) == {"small", "large"}
    for name, records in invoked.items():
        assert_usage_matches(by_function[name], expected_usage(records))


def test_usage_weighs_billed_time_by_memory(
    tenant: Tenant, invoked: dict[str, list[dict[str, Any]]]
) -> None:
    report = usage(tenant, **window_around_now())

    for entry in report["functions"]:
        memory_mb = 640 if entry["function"] == "large" else 128
        expected = entry["billed_ms"] / 1000 * memory_mb / 1024
        assert entry["gb_seconds"] == pytest.approx(expected, rel=0, abs=1e-9)


def test_usage_total_is_the_sum_of_its_functions(
    tenant: Tenant, invoked: dict[str, list[dict[str, Any]]]
) -> None:
    report = usage(tenant, **window_around_now())

    functions = report["functions"]
    assert report["total"]["requests"] == sum(f["requests"] for f in functions) == 5
    assert report["total"]["billed_ms"] == sum(f["billed_ms"] for f in functions)
    assert report["total"]["gb_seconds"] == pytest.approx(
        sum(f["gb_seconds"] for f in functions), rel=0, abs=1e-9
    )
    assert_usage_matches(report["total"], expected_usage(invoked["small"] + invoked["large"]))


def test_default_window_covers_invocations_just_made(
    tenant: Tenant, invoked: dict[str, list[dict[str, Any]]]
) -> None:
    report = usage(tenant)

    assert report["total"]["requests"] == 5
    start = datetime.fromisoformat(report["start"])
    assert (start.day, start.hour, start.minute, start.second) == (1, 0, 0, 0)


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("2000-01-01T00:00:00Z", "2000-02-01T00:00:00Z"),
        ("2999-01-01T00:00:00Z", "2999-02-01T00:00:00Z"),
    ],
)
def test_window_that_excludes_the_invocations_reports_zero(
    tenant: Tenant, invoked: dict[str, list[dict[str, Any]]], start: str, end: str
) -> None:
    report = usage(tenant, start=start, end=end)

    assert report["functions"] == []
    assert report["total"] == EMPTY_TOTAL


def test_window_includes_its_start_and_excludes_its_end(tenant: Tenant) -> None:
    tenant.deploy("edge", WORK)
    # A usage record is stamped with its invocation's finish time.
    finished_at = invoke_records(tenant, "edge", 1)[0]["finished_at"]
    later = (datetime.fromisoformat(finished_at) + timedelta(seconds=1)).isoformat()
    earlier = (datetime.fromisoformat(finished_at) - timedelta(seconds=1)).isoformat()

    from_start = usage(tenant, start=finished_at, end=later)
    to_end = usage(tenant, start=earlier, end=finished_at)

    assert from_start["total"]["requests"] == 1
    assert to_end["total"]["requests"] == 0


def test_report_echoes_its_window(tenant: Tenant) -> None:
    report = usage(tenant, start="2024-03-01T00:00:00Z", end="2024-04-01T12:30:00+02:00")

    assert datetime.fromisoformat(report["start"]) == datetime(2024, 3, 1, tzinfo=UTC)
    assert datetime.fromisoformat(report["end"]) == datetime(2024, 4, 1, 10, 30, tzinfo=UTC)


def test_start_after_end_is_an_invalid_parameter(tenant: Tenant) -> None:
    response = tenant.http.get(
        "/v1/usage", params={"start": "2024-02-01T00:00:00Z", "end": "2024-01-01T00:00:00Z"}
    )

    assert response.status_code == 400
    assert response.json()["type"] == "InvalidParameterValueException"


def test_malformed_date_is_a_validation_error(tenant: Tenant) -> None:
    response = tenant.http.get("/v1/usage", params={"start": "last tuesday"})

    assert response.status_code == 422
    assert response.json()["type"] == "ValidationError"


def test_new_tenant_has_empty_usage(tenant: Tenant) -> None:
    report = usage(tenant)

    assert report["functions"] == []
    assert report["total"] == EMPTY_TOTAL


def test_failed_invocations_are_billed(tenant: Tenant) -> None:
    tenant.deploy("fails", FAILS, memory_mb=256)

    records = invoke_records(tenant, "fails", 2)

    assert all(r["status"] == "error" for r in records)
    [entry] = usage(tenant, **window_around_now())["functions"]
    assert_usage_matches(entry, expected_usage(records))


def test_usage_outlives_the_function(tenant: Tenant) -> None:
    tenant.deploy("ephemeral", WORK)
    records = invoke_records(tenant, "ephemeral", 2)

    tenant.http.delete("/v1/functions/ephemeral")

    [entry] = usage(tenant, **window_around_now())["functions"]
    assert entry["function"] == "ephemeral"
    assert_usage_matches(entry, expected_usage(records))


def test_usage_weighs_each_invocation_by_the_memory_it_ran_with(tenant: Tenant) -> None:
    tenant.deploy("resized", WORK, memory_mb=128)
    records = invoke_records(tenant, "resized", 1)
    tenant.http.patch("/v1/functions/resized", json={"memory_mb": 1024})

    records += invoke_records(tenant, "resized", 1)

    assert [r["memory_mb"] for r in records] == [128, 1024]
    [entry] = usage(tenant, **window_around_now())["functions"]
    assert_usage_matches(entry, expected_usage(records))
