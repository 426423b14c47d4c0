"""Monthly budgets through the HTTP API: thresholds, events and the hard cap."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from app.billing.periods import Period
from tests.api.test_billing_plans import create_plan
from tests.support import Server, Tenant

WORK = "def handler(event, context):\n    return 1\n"
# One cent per request and no free allowance: spending is easy to steer.
CENT_A_REQUEST = {
    "request_price_per_million": "10000",
    "gb_second_price": "0",
    "provisioned_gb_second_price": "0",
    "provisioned_duration_gb_second_price": "0",
}
WAIT_S = 15  # the background check runs every 2 s by default


@pytest.fixture
def priced_tenant(server: Server, tenant: Tenant) -> Tenant:
    plan = create_plan(server, **CENT_A_REQUEST)
    with server.admin() as admin:
        response = admin.post(
            f"/v1/tenants/{tenant.id}/plan-assignments",
            json={
                "plan": plan["name"],
                "effective_from": Period.containing(datetime.now(UTC)).start.isoformat(),
            },
        )
    assert response.status_code == 201, response.text
    tenant.deploy("fn", WORK)
    return tenant


def set_budget(tenant: Tenant, amount: str, hard_cap: bool) -> dict[str, Any]:
    response = tenant.http.put("/v1/budget", json={"amount": amount, "hard_cap": hard_cap})
    assert response.status_code == 200, response.text
    return response.json()


def invoke(tenant: Tenant, times: int) -> None:
    for _ in range(times):
        response = tenant.invoke("fn")
        assert response.status_code == 200, response.text


def events(tenant: Tenant) -> list[dict[str, Any]]:
    response = tenant.http.get("/v1/budget/events")
    assert response.status_code == 200
    return response.json()["events"]


def wait_for_refusal(tenant: Tenant) -> httpx.Response:
    """Invoke until the cap bites (the check runs in the background); the refusal."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        response = tenant.invoke("fn")
        if response.status_code != 200:
            return response
        time.sleep(0.3)
    raise AssertionError("the hard cap never refused an invocation")


def test_a_budget_shows_what_the_period_has_spent(priced_tenant: Tenant) -> None:
    invoke(priced_tenant, 3)

    budget = set_budget(priced_tenant, "1.00", hard_cap=False)

    assert budget["amount"] == "1.00" and budget["currency"] == "USD"
    assert budget["spent"] == "0.03" and budget["percent_used"] == "3.00"
    assert budget["capped"] is False
    assert budget["period"] == Period.containing(datetime.now(UTC)).label
    assert priced_tenant.http.get("/v1/budget").json()["spent"] == "0.03"


def test_crossing_80_and_100_percent_is_recorded_once_each(priced_tenant: Tenant) -> None:
    set_budget(priced_tenant, "0.05", hard_cap=False)
    invoke(priced_tenant, 4)
    priced_tenant.http.get("/v1/budget")  # a read checks the budget at once

    assert [e["threshold_percent"] for e in events(priced_tenant)] == [80]

    invoke(priced_tenant, 2)
    priced_tenant.http.get("/v1/budget")
    invoke(priced_tenant, 1)
    priced_tenant.http.get("/v1/budget")

    recorded = events(priced_tenant)
    assert [e["threshold_percent"] for e in recorded] == [100, 80]
    assert recorded[0]["spent"] == "0.06" and recorded[0]["budget_amount"] == "0.05"
    assert recorded[1]["spent"] == "0.04"


def test_without_a_hard_cap_invocations_go_on(priced_tenant: Tenant) -> None:
    set_budget(priced_tenant, "0.01", hard_cap=False)
    invoke(priced_tenant, 3)
    time.sleep(3)

    invoke(priced_tenant, 2)

    assert priced_tenant.http.get("/v1/budget").json()["capped"] is False


def test_a_hard_cap_refuses_invocations_until_the_budget_is_raised(priced_tenant: Tenant) -> None:
    set_budget(priced_tenant, "0.03", hard_cap=True)
    invoke(priced_tenant, 3)

    refused = wait_for_refusal(priced_tenant)

    assert refused.status_code == 402
    assert refused.json()["type"] == "BudgetExceededException"
    assert "0.03 USD" in refused.json()["message"]
    assert priced_tenant.http.get("/v1/budget").json()["capped"] is True
    assert 100 in [e["threshold_percent"] for e in events(priced_tenant)]

    raised = set_budget(priced_tenant, "5.00", hard_cap=True)

    assert raised["capped"] is False
    invoke(priced_tenant, 1)


def test_a_cap_set_below_what_is_already_spent_applies_at_once(priced_tenant: Tenant) -> None:
    invoke(priced_tenant, 2)

    budget = set_budget(priced_tenant, "0.01", hard_cap=True)
    response = priced_tenant.invoke("fn")

    assert budget["capped"] is True
    assert response.status_code == 402


def test_removing_the_budget_lifts_the_cap(priced_tenant: Tenant) -> None:
    invoke(priced_tenant, 1)
    set_budget(priced_tenant, "0.01", hard_cap=True)

    deleted = priced_tenant.http.delete("/v1/budget")

    assert deleted.status_code == 204
    invoke(priced_tenant, 1)
    assert priced_tenant.http.get("/v1/budget").status_code == 404


def test_a_cap_is_per_tenant(priced_tenant: Tenant, other_tenant: Tenant) -> None:
    other_tenant.deploy("fn", WORK)
    invoke(priced_tenant, 1)

    set_budget(priced_tenant, "0.01", hard_cap=True)

    assert priced_tenant.invoke("fn").status_code == 402
    invoke(other_tenant, 1)


def test_no_budget_means_not_found_and_no_events(tenant: Tenant) -> None:
    response = tenant.http.get("/v1/budget")

    assert response.status_code == 404
    assert response.json()["type"] == "ResourceNotFound"
    assert events(tenant) == []
    assert tenant.http.delete("/v1/budget").status_code == 404


@pytest.mark.parametrize(
    ("amount", "status"),
    [(10, 422), ("-1", 422), ("0", 400), ("0.001", 400), ("ten", 422)],
)
def test_invalid_budgets_are_refused(tenant: Tenant, amount: object, status: int) -> None:
    response = tenant.http.put("/v1/budget", json={"amount": amount})

    assert response.status_code == status, response.text
