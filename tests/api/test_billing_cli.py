"""The billing commands: plans and invoices from a terminal."""

from __future__ import annotations

import csv
import io
import json
import uuid
from datetime import UTC, datetime

from app.billing.periods import Period
from tests.support import Server, Tenant
from tests.test_cli import run_cli


def test_operator_manages_plans_and_a_tenant_reads_its_invoices(
    server: Server, tenant: Tenant
) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    start = Period.containing(datetime.now(UTC)).start.isoformat()
    admin = server.admin_key

    created = run_cli(
        server,
        admin,
        "plans", "create", name,
        "--request-price-per-million", "10000",
        "--gb-second-price", "0.5",
        "--tier", "100:0.25",
        "--provisioned-gb-second-price", "0",
        "--provisioned-duration-gb-second-price", "0",
    )  # fmt: skip
    run_cli(server, admin, "plans", "assign", tenant.id, name, "--from", start)
    changed = run_cli(server, admin, "plans", "change", name, "--free-requests", "1")
    listed = run_cli(server, admin, "plans", "list")
    tenant.deploy("fn", "def handler(event, context):\n    return 1\n")
    tenant.invoke("fn")
    tenant.invoke("fn")
    invoices = run_cli(server, tenant.key, "invoices", "list")
    invoice_id = tenant.http.get("/v1/invoices").json()["invoices"][0]["id"]
    as_csv = run_cli(server, tenant.key, "invoices", "get", invoice_id, "--csv")
    everyone = run_cli(server, admin, "invoices", "list", "--all-tenants", "--tenant", tenant.id)

    assert json.loads(created.stdout)["current"]["tiers"] == [
        {"above_gb_seconds": "100", "gb_second_price": "0.25"}
    ]
    assert [v["free_requests"] for v in json.loads(changed.stdout)["versions"]] == [0, 1]
    assert name in listed.stdout
    assert invoice_id in invoices.stdout and "open" in invoices.stdout
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert rows[0]["function"] == "fn" and rows[0]["requests"] == "2"
    assert rows[-1]["kind"] == "total"
    assert invoice_id in everyone.stdout


def test_cli_reports_api_errors(server: Server, tenant: Tenant) -> None:
    result = run_cli(server, tenant.key, "plans", "list", check=False)

    assert result.returncode == 1
    assert "AccessDenied" in result.stderr
