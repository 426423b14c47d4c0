"""Price plans and plan assignments through the HTTP API (operator key)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app.billing.periods import Period
from tests.support import Server, Tenant

PRICES = {
    "request_price_per_million": "0.25",
    "gb_second_price": "0.00002",
    "provisioned_gb_second_price": "0.000005",
    "provisioned_duration_gb_second_price": "0.00001",
}


def plan_name() -> str:
    return f"plan-{uuid.uuid4().hex[:10]}"


def create_plan(server: Server, **fields: Any) -> dict[str, Any]:
    body = {"name": plan_name(), **PRICES, **fields}
    with server.admin() as admin:
        response = admin.post("/v1/plans", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def current_period() -> Period:
    return Period.containing(datetime.now(UTC))


def next_minute() -> datetime:
    return (datetime.now(UTC) + timedelta(minutes=1)).replace(second=0, microsecond=0)


def test_the_default_plan_has_lambdas_list_prices(server: Server) -> None:
    with server.admin() as admin:
        default = admin.get("/v1/plans/default").json()

    assert default["currency"] == "USD" and default["minor_units"] == 2
    assert default["versions"][0]["effective_from"].startswith("1970-01-01")
    assert default["versions"][0] == {
        "effective_from": default["versions"][0]["effective_from"],
        "request_price_per_million": "0.20",
        "gb_second_price": "0.0000166667",
        "tiers": [
            {"above_gb_seconds": "6000000000", "gb_second_price": "0.000015"},
            {"above_gb_seconds": "15000000000", "gb_second_price": "0.000013334"},
        ],
        "free_requests": 1000000,
        "free_gb_seconds": "400000",
        "provisioned_gb_second_price": "0.0000041667",
        "provisioned_duration_gb_second_price": "0.0000097222",
        "bill_init": True,
    }


def test_operator_creates_a_plan_with_tiers_and_allowance(server: Server) -> None:
    plan = create_plan(
        server,
        currency="EUR",
        tiers=[{"above_gb_seconds": "1000", "gb_second_price": "0.000018"}],
        free_requests=10,
        free_gb_seconds="2.5",
        bill_init=False,
    )

    assert plan["currency"] == "EUR" and plan["minor_units"] == 2
    assert plan["current"]["tiers"] == [{"above_gb_seconds": "1000", "gb_second_price": "0.000018"}]
    assert plan["current"]["free_gb_seconds"] == "2.5"
    assert plan["current"]["bill_init"] is False
    with server.admin() as admin:
        listed = {p["name"] for p in admin.get("/v1/plans").json()["plans"]}
    assert {"default", plan["name"]} <= listed


def test_prices_given_as_json_numbers_are_refused(server: Server) -> None:
    body = {"name": plan_name(), **PRICES, "gb_second_price": 0.0000166667}

    with server.admin() as admin:
        response = admin.post("/v1/plans", json=body)

    assert response.status_code == 422
    assert "strings" in response.json()["message"]


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"gb_second_price": "-1"}, 422),
        ({"gb_second_price": "1e-5"}, 422),
        ({"tiers": [{"above_gb_seconds": "5", "gb_second_price": "1"}] * 2}, 422),
        ({"tiers": [{"above_gb_seconds": "0", "gb_second_price": "1"}]}, 422),
        ({"currency": "usd"}, 422),
        ({"currency": "XTS"}, 400),
    ],
)
def test_invalid_plans_are_refused(server: Server, fields: dict[str, Any], status: int) -> None:
    with server.admin() as admin:
        response = admin.post("/v1/plans", json={"name": plan_name(), **PRICES, **fields})

    assert response.status_code == status, response.text


def test_a_currency_without_known_minor_units_needs_them(server: Server) -> None:
    plan = create_plan(server, currency="XTS", minor_units=3)
    yen = create_plan(server, currency="JPY")

    assert plan["minor_units"] == 3
    assert yen["minor_units"] == 0


def test_plan_names_are_unique(server: Server) -> None:
    plan = create_plan(server)

    with server.admin() as admin:
        response = admin.post("/v1/plans", json={"name": plan["name"], **PRICES})

    assert response.status_code == 409
    assert response.json()["type"] == "ResourceConflictException"


def test_a_change_adds_a_version_from_its_time_on(server: Server) -> None:
    plan = create_plan(server)
    later = next_minute() + timedelta(hours=1)

    with server.admin() as admin:
        response = admin.patch(
            f"/v1/plans/{plan['name']}",
            json={"gb_second_price": "0.00003", "effective_from": later.isoformat()},
        )

    assert response.status_code == 200, response.text
    changed = response.json()
    assert [v["gb_second_price"] for v in changed["versions"]] == ["0.00002", "0.00003"]
    assert changed["versions"][1]["request_price_per_million"] == "0.25"  # kept
    assert datetime.fromisoformat(changed["versions"][1]["effective_from"]) == later
    assert changed["current"]["gb_second_price"] == "0.00002"  # not yet in force


def test_a_change_without_a_time_applies_from_the_next_minute(server: Server) -> None:
    plan = create_plan(server)

    with server.admin() as admin:
        changed = admin.patch(f"/v1/plans/{plan['name']}", json={"free_requests": 5}).json()

    effective = datetime.fromisoformat(changed["versions"][1]["effective_from"])
    assert timedelta(0) <= effective - datetime.now(UTC) <= timedelta(minutes=1)
    assert effective.second == 0


@pytest.mark.parametrize(
    ("effective_from", "status", "error"),
    [
        (lambda: current_period().start - timedelta(days=1), 409, "ResourceConflictException"),
        (lambda: next_minute() + timedelta(seconds=30), 400, "InvalidParameterValueException"),
    ],
)
def test_changes_cannot_reach_into_ended_periods_or_start_mid_minute(
    server: Server, effective_from: Any, status: int, error: str
) -> None:
    plan = create_plan(server)

    with server.admin() as admin:
        response = admin.patch(
            f"/v1/plans/{plan['name']}",
            json={"gb_second_price": "1", "effective_from": effective_from().isoformat()},
        )

    assert response.status_code == status, response.text
    assert response.json()["type"] == error


def test_unknown_plans_are_not_found(server: Server, tenant: Tenant) -> None:
    with server.admin() as admin:
        got = admin.get("/v1/plans/nope")
        changed = admin.patch("/v1/plans/nope", json={"free_requests": 1})
        assigned = admin.post(f"/v1/tenants/{tenant.id}/plan-assignments", json={"plan": "nope"})

    assert [r.status_code for r in (got, changed, assigned)] == [404, 404, 404]


def test_operator_assigns_a_plan_and_the_tenant_sees_it(server: Server, tenant: Tenant) -> None:
    plan = create_plan(server)
    assert tenant.http.get("/v1/plan").json()["plan"] == "default"
    start = current_period().start

    with server.admin() as admin:
        response = admin.post(
            f"/v1/tenants/{tenant.id}/plan-assignments",
            json={"plan": plan["name"], "effective_from": start.isoformat()},
        )
        listed = admin.get(f"/v1/tenants/{tenant.id}/plan-assignments").json()

    assert response.status_code == 201, response.text
    assert [a["plan"] for a in listed["assignments"]] == [plan["name"]]
    mine = tenant.http.get("/v1/plan").json()
    assert mine["plan"] == plan["name"]
    assert mine["prices"]["gb_second_price"] == "0.00002"


def test_an_assignment_cannot_reach_into_an_ended_period(server: Server, tenant: Tenant) -> None:
    plan = create_plan(server)
    last_month = current_period().previous().start

    with server.admin() as admin:
        response = admin.post(
            f"/v1/tenants/{tenant.id}/plan-assignments",
            json={"plan": plan["name"], "effective_from": last_month.isoformat()},
        )

    assert response.status_code == 409
    assert "ended" in response.json()["message"]


def test_a_change_of_currency_only_starts_with_a_period(server: Server, tenant: Tenant) -> None:
    euros = create_plan(server, currency="EUR")
    next_period = current_period().next().start

    with server.admin() as admin:
        mid_period = admin.post(
            f"/v1/tenants/{tenant.id}/plan-assignments",
            json={"plan": euros["name"], "effective_from": next_minute().isoformat()},
        )
        at_period_start = admin.post(
            f"/v1/tenants/{tenant.id}/plan-assignments",
            json={"plan": euros["name"], "effective_from": next_period.isoformat()},
        )

    assert mid_period.status_code == 409
    assert "currency" in mid_period.json()["message"]
    assert at_period_start.status_code == 201, at_period_start.text


def test_assigning_to_an_unknown_tenant_is_not_found(server: Server) -> None:
    with server.admin() as admin:
        response = admin.post(
            f"/v1/tenants/{uuid.uuid4().hex}/plan-assignments", json={"plan": "default"}
        )

    assert response.status_code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/plans"),
        ("POST", "/v1/plans"),
        ("PATCH", "/v1/plans/default"),
        ("GET", "/v1/operator/invoices"),
        ("GET", "/v1/operator/usage"),
    ],
)
def test_plan_and_operator_routes_refuse_a_tenant_key(
    tenant: Tenant, method: str, path: str
) -> None:
    response = tenant.http.request(method, path, json={})

    assert response.status_code == 403
    assert response.json()["type"] == "AccessDenied"


def test_tenant_billing_routes_refuse_the_operator_key(server: Server) -> None:
    with server.admin() as admin:
        responses = [admin.get(path) for path in ("/v1/plan", "/v1/invoices", "/v1/budget")]

    assert [r.status_code for r in responses] == [403, 403, 403]
