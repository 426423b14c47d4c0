"""Invoices through the HTTP API: running totals, lines per function, finalisation, CSV."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest

from app.billing.periods import Period
from app.billing.provisioned import record_provisioned_change
from app.db import Database
from tests.api.test_billing_plans import create_plan
from tests.billing_support import database_url, insert_usage, usage_row, with_db
from tests.support import Server, Tenant, create_tenant

WORK = "def handler(event, context):\n    return sum(range(event.get('n', 1000)))\n"
GB_S = Decimal(1_024_000)
# No free allowance and prices large enough that a few invocations cost cents.
COSTLY = {
    "request_price_per_million": "20000",
    "gb_second_price": "0.3",
    "provisioned_gb_second_price": "0.1",
    "provisioned_duration_gb_second_price": "0.2",
    "bill_init": False,
}


def cents(amount: Decimal) -> Decimal:
    return amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def put_on_plan(server: Server, tenant: Tenant, plan: str, at: datetime) -> None:
    with server.admin() as admin:
        response = admin.post(
            f"/v1/tenants/{tenant.id}/plan-assignments",
            json={"plan": plan, "effective_from": at.isoformat()},
        )
    assert response.status_code == 201, response.text


def invoice(tenant: Tenant, invoice_id: str) -> dict[str, Any]:
    response = tenant.http.get(f"/v1/invoices/{invoice_id}")
    assert response.status_code == 200, response.text
    return response.json()


def invoices(tenant: Tenant) -> list[dict[str, Any]]:
    response = tenant.http.get("/v1/invoices")
    assert response.status_code == 200, response.text
    return response.json()["invoices"]


def invoke_records(tenant: Tenant, name: str, times: int) -> list[dict[str, Any]]:
    request_ids = [tenant.invoke(name).headers["x-request-id"] for _ in range(times)]
    return [tenant.invocation(request_id) for request_id in request_ids]


@pytest.fixture
def costly_tenant(server: Server, tenant: Tenant) -> Tenant:
    plan = create_plan(server, **COSTLY)
    put_on_plan(server, tenant, plan["name"], Period.containing(datetime.now(UTC)).start)
    return tenant


def test_the_open_invoice_prices_each_functions_usage(costly_tenant: Tenant) -> None:
    tenant = costly_tenant
    tenant.deploy("small", WORK, memory_mb=128)
    tenant.deploy("large", WORK, memory_mb=1024)
    records = {
        "small": invoke_records(tenant, "small", 3),
        "large": invoke_records(tenant, "large", 2),
    }

    [current] = invoices(tenant)
    body = invoice(tenant, current["id"])

    assert body["status"] == "open" and body["finalised_at"] is None
    assert body["plans"] == [tenant_plan(tenant)]
    lines = {line["function"]: line for line in body["lines"]}
    assert set(lines) == {"small", "large"}
    for name, rs in records.items():
        line = lines[name]
        billed_ms = sum(r["billed_duration_ms"] for r in rs)
        gbs = sum(Decimal(r["billed_duration_ms"] * r["memory_mb"]) for r in rs) / GB_S
        exact = len(rs) * Decimal(20000) / 1_000_000 + gbs * Decimal("0.3")
        assert (line["kind"], line["requests"], line["billed_ms"]) == (
            "invocations",
            len(rs),
            billed_ms,
        )
        assert Decimal(line["gb_seconds"]) == gbs
        assert Decimal(line["exact_amount"]) == exact
        assert line["amount"] == str(cents(exact))
    assert body["total"] == str(sum(Decimal(line["amount"]) for line in body["lines"]))
    assert current["total"] == body["total"]


def tenant_plan(tenant: Tenant) -> str:
    return tenant.http.get("/v1/plan").json()["plan"]


def test_the_running_total_grows_with_usage(costly_tenant: Tenant) -> None:
    tenant = costly_tenant
    tenant.deploy("fn", WORK)
    invoke_records(tenant, "fn", 1)
    first = invoices(tenant)[0]

    invoke_records(tenant, "fn", 2)
    second = invoices(tenant)[0]

    assert second["id"] == first["id"]
    assert second["requests"] == first["requests"] + 2
    assert Decimal(second["total"]) > Decimal(first["total"])


def test_the_csv_has_the_same_lines_and_total(costly_tenant: Tenant) -> None:
    tenant = costly_tenant
    tenant.deploy("a", WORK)
    tenant.deploy("b", WORK)
    invoke_records(tenant, "a", 2)
    invoke_records(tenant, "b", 1)
    invoice_id = invoices(tenant)[0]["id"]

    response = tenant.http.get(f"/v1/invoices/{invoice_id}.csv")
    body = invoice(tenant, invoice_id)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [(r["function"], r["amount"]) for r in rows[:-1]] == [
        (line["function"], line["amount"]) for line in body["lines"]
    ]
    assert rows[-1]["kind"] == "total"
    assert rows[-1]["amount"] == body["total"] and rows[-1]["exact_amount"] == body["exact_total"]
    assert int(rows[-1]["requests"]) == body["requests"] == 3


def test_default_plan_usage_within_the_free_allowance_costs_nothing(tenant: Tenant) -> None:
    tenant.deploy("free", WORK)
    invoke_records(tenant, "free", 2)

    body = invoice(tenant, invoices(tenant)[0]["id"])

    [line] = body["lines"]
    assert line["free_requests"] == 2
    assert line["free_gb_seconds"] == line["gb_seconds"]
    assert line["amount"] == "0.00" and body["total"] == "0.00"
    assert body["currency"] == "USD"


def test_another_tenants_invoice_is_not_found(tenant: Tenant, other_tenant: Tenant) -> None:
    invoice_id = invoices(other_tenant)[0]["id"]

    assert tenant.http.get(f"/v1/invoices/{invoice_id}").status_code == 404
    assert tenant.http.get(f"/v1/invoices/{invoice_id}.csv").status_code == 404
    assert tenant.http.get("/v1/invoices/not-an-invoice").status_code == 404


def test_a_future_period_has_no_invoice(tenant: Tenant) -> None:
    future = Period.containing(datetime.now(UTC)).next()

    response = tenant.http.get(f"/v1/invoices/inv-{future.start:%Y%m}-{tenant.id}")

    assert response.status_code == 404


def last_month() -> Period:
    return Period.containing(datetime.now(UTC)).previous()


def test_an_ended_period_is_finalised_and_never_changes(
    server: Server, tenant: Tenant, request: pytest.FixtureRequest
) -> None:
    url = database_url(server, request)
    period = last_month()
    at = period.start + timedelta(days=10, hours=3)
    # 500,000 GB-seconds at 10,240 MB: 100,000 beyond the default plan's free allowance.
    insert_usage(url, [usage_row(tenant.id, "batch", at, billed_ms=50_000_000, memory_mb=10240)])

    listed = invoices(tenant)
    final = invoice(tenant, f"inv-{period.start:%Y%m}-{tenant.id}")

    assert [i["status"] for i in listed] == ["open", "final"]
    assert final["status"] == "final" and final["finalised_at"]
    [line] = final["lines"]
    assert line["free_gb_seconds"] == "400000" and line["gb_seconds"] == "500000"
    assert line["exact_amount"] == "1.66667" and final["total"] == "1.67"

    # Neither late usage nor changes of plan reach it: the changes are refused, and the usage
    # record stays out of the stored invoice.
    insert_usage(url, [usage_row(tenant.id, "batch", at, billed_ms=60_000_000, memory_mb=10240)])
    with server.admin() as admin:
        assigned = admin.post(
            f"/v1/tenants/{tenant.id}/plan-assignments",
            json={"plan": "default", "effective_from": period.start.isoformat()},
        )
        changed = admin.patch(
            "/v1/plans/default",
            json={"gb_second_price": "1", "effective_from": period.start.isoformat()},
        )
    assert assigned.status_code == changed.status_code == 409
    again = invoice(tenant, final["id"])
    assert again == final


def test_a_plan_change_within_the_period_applies_from_its_time(
    server: Server, tenant: Tenant, request: pytest.FixtureRequest
) -> None:
    now = datetime.now(UTC)
    period = Period.containing(now)
    if now - period.start < timedelta(hours=2):
        pytest.skip("needs two hours of the current billing period behind it")
    change = (now - timedelta(hours=1)).replace(second=0, microsecond=0)
    plan = create_plan(server, **COSTLY)
    put_on_plan(server, tenant, plan["name"], period.start)
    with server.admin() as admin:
        response = admin.patch(
            f"/v1/plans/{plan['name']}",
            json={"gb_second_price": "0.6", "effective_from": change.isoformat()},
        )
    assert response.status_code == 200, response.text
    insert_usage(
        database_url(server, request),
        [
            usage_row(tenant.id, "f", change - timedelta(minutes=10), billed_ms=1000),
            usage_row(tenant.id, "f", change + timedelta(minutes=10), billed_ms=1000),
        ],
    )

    body = invoice(tenant, invoices(tenant)[0]["id"])

    # 1 GB-second at 0.3 before the change and 1 at 0.6 after, plus two requests at 0.02.
    [line] = body["lines"]
    assert Decimal(line["exact_amount"]) == Decimal("0.94")
    assert body["plans"] == [plan["name"]]


def test_operator_sees_every_tenants_invoices(server: Server, costly_tenant: Tenant) -> None:
    other = create_tenant(server)
    for who in (costly_tenant, other):
        who.deploy("fn", WORK)
        invoke_records(who, "fn", 1)
    period = Period.containing(datetime.now(UTC)).label

    with server.admin() as admin:
        everyone = admin.get("/v1/operator/invoices", params={"period": period}).json()
        one = admin.get("/v1/operator/invoices", params={"tenant_id": other.id}).json()
        invoice_id = one["invoices"][0]["id"]
        detail = admin.get(f"/v1/operator/invoices/{invoice_id}")
        as_csv = admin.get(f"/v1/operator/invoices/{invoice_id}.csv")
        bad = admin.get("/v1/operator/invoices", params={"period": "someday"})

    ids = {i["tenant_id"] for i in everyone["invoices"]}
    assert {costly_tenant.id, other.id} <= ids
    assert {i["period"] for i in everyone["invoices"]} == {period}
    assert {i["tenant_id"] for i in one["invoices"]} == {other.id}
    assert detail.status_code == 200 and detail.json() == invoice(other, invoice_id) | {
        "computed_at": detail.json()["computed_at"]
    }
    assert as_csv.status_code == 200 and other.id in as_csv.text
    assert bad.status_code == 400
    other.http.close()


def test_provisioned_concurrency_has_its_own_invoice_lines(
    server: Server, tenant: Tenant, request: pytest.FixtureRequest
) -> None:
    url = database_url(server, request)
    period = last_month()
    on = period.start + timedelta(days=5, hours=10)

    # What the scheduler calls when a function's provisioned concurrency changes.
    async def provision(db: Database) -> None:
        async with db.sessionmaker() as session:
            for minutes, count in ((0, 2), (20, 0)):
                await record_provisioned_change(
                    session,
                    tenant_id=tenant.id,
                    function_id="fn-api",
                    function_name="api",
                    memory_mb=1024,
                    count=count,
                    at=on + timedelta(minutes=minutes),
                )
            await session.commit()

    with_db(url, provision)
    insert_usage(
        url,
        [
            usage_row(tenant.id, "api", on + timedelta(minutes=7), billed_ms=3000),
            usage_row(tenant.id, "api", on + timedelta(hours=1), billed_ms=5000),
        ],
    )

    body = invoice(tenant, f"inv-{period.start:%Y%m}-{tenant.id}")

    lines = {line["kind"]: line for line in body["lines"]}
    assert set(lines) == {"invocations", "provisioned_duration", "provisioned_concurrency"}
    assert lines["invocations"]["requests"] == 2 and lines["invocations"]["billed_ms"] == 5000
    assert lines["provisioned_duration"]["billed_ms"] == 3000
    assert lines["provisioned_duration"]["exact_amount"] == "0.0000291666"  # 3 GB-s
    # Four 5-minute blocks of 2 × 1 GB: 2,400 GB-seconds at the default plan's price.
    assert lines["provisioned_concurrency"]["gb_seconds"] == "2400"
    assert lines["provisioned_concurrency"]["exact_amount"] == "0.01000008"
    assert lines["provisioned_concurrency"]["amount"] == "0.01"
