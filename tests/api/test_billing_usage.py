"""Usage series for charts, per tenant and across tenants, through the HTTP API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.billing_support import database_url, insert_usage, usage_row
from tests.support import Server, Tenant

WORK = "def handler(event, context):\n    return 1\n"


def usage(tenant: Tenant, **params: str) -> dict[str, Any]:
    response = tenant.http.get("/v1/usage", params=params)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def history(server: Server, tenant: Tenant, request: pytest.FixtureRequest) -> datetime:
    """Usage of two functions over three hours of a day two days ago; returns its start."""
    start = (datetime.now(UTC) - timedelta(days=2)).replace(
        hour=9, minute=0, second=0, microsecond=0
    )
    rows = [
        usage_row(tenant.id, name, start + timedelta(minutes=m, seconds=s), billed_ms=ms)
        for name, ms in (("api", 100), ("worker", 250))
        for m in (0, 1, 61, 150)
        for s in (5, 40)
    ]
    insert_usage(database_url(server, request), rows)
    return start


def window(start: datetime, hours: int = 4) -> dict[str, str]:
    return {"start": start.isoformat(), "end": (start + timedelta(hours=hours)).isoformat()}


def test_minute_series_has_a_point_per_minute_with_usage(tenant: Tenant, history: datetime) -> None:
    report = usage(tenant, granularity="minute", **window(history))

    assert report["granularity"] == "minute"
    series = {s["function"]: s["points"] for s in report["series"]}
    assert set(series) == {"api", "worker"}
    starts = [datetime.fromisoformat(p["start"]) for p in series["api"]]
    assert starts == [history + timedelta(minutes=m) for m in (0, 1, 61, 150)]
    assert [p["requests"] for p in series["api"]] == [2, 2, 2, 2]
    assert [p["billed_ms"] for p in series["worker"]] == [500, 500, 500, 500]


def test_hour_and_day_series_add_up_to_the_totals(tenant: Tenant, history: datetime) -> None:
    hourly = usage(tenant, granularity="hour", **window(history))
    daily = usage(tenant, granularity="day", **window(history))

    api_hours = next(s["points"] for s in hourly["series"] if s["function"] == "api")
    assert [datetime.fromisoformat(p["start"]) for p in api_hours] == [
        history,
        history + timedelta(hours=1),
        history + timedelta(hours=2),
    ]
    assert [p["requests"] for p in api_hours] == [4, 2, 2]
    for report in (hourly, daily):
        by_function = {f["function"]: f for f in report["functions"]}
        for entry in report["series"]:
            total = by_function[entry["function"]]
            assert sum(p["requests"] for p in entry["points"]) == total["requests"] == 8
            assert sum(p["billed_ms"] for p in entry["points"]) == total["billed_ms"]
    assert [len(s["points"]) for s in daily["series"]] == [1, 1]


def test_series_include_usage_just_recorded(tenant: Tenant) -> None:
    tenant.deploy("fresh", WORK)
    for _ in range(3):
        tenant.invoke("fresh")

    report = usage(tenant, granularity="minute")

    [series] = report["series"]
    assert sum(p["requests"] for p in series["points"]) == 3


def test_without_a_granularity_there_is_no_series(tenant: Tenant, history: datetime) -> None:
    report = usage(tenant, **window(history))

    assert report["series"] is None and report["granularity"] is None
    assert report["total"]["requests"] == 16


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"granularity": "week"}, 422),
        ({"granularity": "minute", "start": "2020-01-01T00:00:00Z"}, 400),
    ],
)
def test_bad_series_requests_are_refused(
    tenant: Tenant, params: dict[str, str], status: int
) -> None:
    response = tenant.http.get("/v1/usage", params=params)

    assert response.status_code == status, response.text


def test_operator_sees_usage_across_tenants(
    server: Server, tenant: Tenant, other_tenant: Tenant, history: datetime
) -> None:
    other_tenant.deploy("fn", WORK)
    other_tenant.invoke("fn")
    now = datetime.now(UTC)

    with server.admin() as admin:
        everyone = admin.get(
            "/v1/operator/usage",
            params={
                "start": history.isoformat(),
                "end": (now + timedelta(minutes=1)).isoformat(),
                "granularity": "hour",
            },
        ).json()
        one = admin.get(
            "/v1/operator/usage", params={"tenant_id": tenant.id, **window(history)}
        ).json()

    tenants = {t["tenant_id"]: t for t in everyone["tenants"]}
    assert tenants[tenant.id]["total"]["requests"] == 16
    assert tenants[other_tenant.id]["total"]["requests"] == 1
    assert {s["function"] for s in tenants[tenant.id]["series"]} == {"api", "worker"}
    assert everyone["total"]["requests"] == sum(t["total"]["requests"] for t in tenants.values())
    assert [t["tenant_id"] for t in one["tenants"]] == [tenant.id]
