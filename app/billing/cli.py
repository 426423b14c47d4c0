"""``lambent reconcile``, ``lambent plans ...`` and ``lambent invoices ...``.

``reconcile`` reads the database directly, like ``migrate``; the others use the API with the
operator's key (``invoices`` also with a tenant's).
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

billing_cli = typer.Typer()
plans_cli = typer.Typer(help="Price plans and who is on them (operator key).", no_args_is_help=True)
invoices_cli = typer.Typer(help="Invoices: yours, or every tenant's.", no_args_is_help=True)
billing_cli.add_typer(plans_cli, name="plans")
billing_cli.add_typer(invoices_cli, name="invoices")

console = Console()
errors = Console(stderr=True)

UrlOption = Annotated[
    str | None, typer.Option("--url", envvar="LAMBENT_URL", help="API address", show_default=False)
]
KeyOption = Annotated[
    str | None,
    typer.Option("--key", envvar="LAMBENT_API_KEY", help="API key", show_default=False),
]
PRICE_OPTIONS = {
    "request_price_per_million": "Price per million requests",
    "gb_second_price": "Price per GB-second (below the first tier)",
    "provisioned_gb_second_price": "Price per GB-second of provisioned concurrency",
    "provisioned_duration_gb_second_price": "Price per GB-second of duration while provisioned",
}


def _call(url: str | None, key: str | None, method: str, path: str, **kwargs: Any) -> Any:
    from httpx import HTTPError

    from app.client import ApiError, LambentClient

    try:
        return LambentClient(url, key).request(method, path, **kwargs)
    except ApiError as error:
        errors.print(f"[red]{error.type}[/red] ({error.status}): {error.message}")
        raise typer.Exit(1) from None
    except HTTPError as error:
        errors.print(f"[red]cannot reach Lambent[/red]: {error}")
        raise typer.Exit(1) from None


def _print_json(value: Any) -> None:
    console.print_json(json.dumps(value, default=str))


def _tiers(values: list[str] | None) -> list[dict[str, str]] | None:
    if values is None:
        return None
    tiers = []
    for value in values:
        above, _, price = value.partition(":")
        if not price:
            raise typer.BadParameter(f"{value!r}: a tier is ABOVE_GB_SECONDS:PRICE")
        tiers.append({"above_gb_seconds": above, "gb_second_price": price})
    return tiers


# Reconciliation.


@billing_cli.command()
def reconcile(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant id")] = None,
    period: Annotated[
        list[str] | None, typer.Option(help="YYYY-MM, repeatable; default: this and last month")
    ] = None,
    rollup: Annotated[bool, typer.Option(help="Run the rollup job first")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show passing checks")] = False,
) -> None:
    """Check that usage records, rollups and invoices agree; exit 1 on any difference."""
    from app.billing.periods import Period

    now = datetime.now(UTC)
    try:
        periods = [Period.parse(p) for p in period] if period else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if periods is None:
        current = Period.containing(now)
        periods = [current.previous(), current]
    checks = asyncio.run(_reconcile(tenant, periods, now, rollup))

    failed = [c for c in checks if not c.ok]
    shown = checks if verbose else failed
    if shown:
        table = Table("period", "tenant", "check", "expected (records)", "actual", "")
        for check in shown:
            mark = "[green]ok[/green]" if check.ok else "[red]MISMATCH[/red]"
            table.add_row(
                check.period, check.tenant_id, check.what, check.expected, check.actual, mark
            )
        console.print(table)
    periods_text = ", ".join(p.label for p in periods)
    if failed:
        errors.print(f"[red]{len(failed)} of {len(checks)} checks differ[/red] ({periods_text})")
        raise typer.Exit(1)
    console.print(f"reconciled: {len(checks)} checks agree ({periods_text})")


async def _reconcile(
    tenant: str | None, periods: list[Any], now: datetime, rollup: bool
) -> list[Any]:
    from app.db import Database
    from app.metering.reconcile import reconcile_period
    from app.metering.rollups import roll_up
    from app.settings import get_settings

    settings = get_settings()
    db = Database(settings.resolved_database_url)
    try:
        if rollup:
            await roll_up(db.engine, settle_s=settings.metering_settle_s)
        checks = []
        async with db.sessionmaker() as session:
            for period in periods:
                checks += await reconcile_period(session, period, now, tenant_id=tenant)
        return checks
    finally:
        await db.dispose()


# Plans.


@plans_cli.command("list")
def plans_list(url: UrlOption = None, key: KeyOption = None) -> None:
    """Every plan with its prices now."""
    body = _call(url, key, "GET", "/v1/plans").json()
    table = Table(
        "plan", "currency", "per 1M requests", "per GB-s", "tiers", "free req", "free GB-s"
    )
    for plan in body["plans"]:
        now = plan["current"]
        tiers = ", ".join(f">{t['above_gb_seconds']}: {t['gb_second_price']}" for t in now["tiers"])
        table.add_row(
            plan["name"],
            plan["currency"],
            now["request_price_per_million"],
            now["gb_second_price"],
            tiers,
            str(now["free_requests"]),
            now["free_gb_seconds"],
        )
    console.print(table)


@plans_cli.command("get")
def plans_get(name: str, url: UrlOption = None, key: KeyOption = None) -> None:
    """A plan with every version of its prices."""
    _print_json(_call(url, key, "GET", f"/v1/plans/{name}").json())


@plans_cli.command("create")
def plans_create(
    name: str,
    request_price_per_million: Annotated[
        str, typer.Option(help=PRICE_OPTIONS["request_price_per_million"])
    ],
    gb_second_price: Annotated[str, typer.Option(help=PRICE_OPTIONS["gb_second_price"])],
    provisioned_gb_second_price: Annotated[
        str, typer.Option(help=PRICE_OPTIONS["provisioned_gb_second_price"])
    ],
    provisioned_duration_gb_second_price: Annotated[
        str, typer.Option(help=PRICE_OPTIONS["provisioned_duration_gb_second_price"])
    ],
    currency: Annotated[str, typer.Option(help="ISO 4217 code")] = "USD",
    tier: Annotated[
        list[str] | None, typer.Option(help="ABOVE_GB_SECONDS:PRICE per GB-second, repeatable")
    ] = None,
    free_requests: Annotated[int, typer.Option(help="Free requests a month")] = 0,
    free_gb_seconds: Annotated[str, typer.Option(help="Free GB-seconds a month")] = "0",
    bill_init: Annotated[bool, typer.Option(help="Charge the init phase of cold starts")] = True,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Create a price plan."""
    body = {
        "name": name,
        "currency": currency,
        "request_price_per_million": request_price_per_million,
        "gb_second_price": gb_second_price,
        "tiers": _tiers(tier) or [],
        "free_requests": free_requests,
        "free_gb_seconds": free_gb_seconds,
        "provisioned_gb_second_price": provisioned_gb_second_price,
        "provisioned_duration_gb_second_price": provisioned_duration_gb_second_price,
        "bill_init": bill_init,
    }
    _print_json(_call(url, key, "POST", "/v1/plans", json=body).json())


@plans_cli.command("change")
def plans_change(
    name: str,
    effective_from: Annotated[
        str | None, typer.Option("--from", help="A whole UTC minute; default: the next one")
    ] = None,
    request_price_per_million: Annotated[str | None, typer.Option()] = None,
    gb_second_price: Annotated[str | None, typer.Option()] = None,
    provisioned_gb_second_price: Annotated[str | None, typer.Option()] = None,
    provisioned_duration_gb_second_price: Annotated[str | None, typer.Option()] = None,
    tier: Annotated[list[str] | None, typer.Option(help="Replaces every tier; repeatable")] = None,
    free_requests: Annotated[int | None, typer.Option()] = None,
    free_gb_seconds: Annotated[str | None, typer.Option()] = None,
    bill_init: Annotated[bool | None, typer.Option("--bill-init/--no-bill-init")] = None,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Change a plan's prices from a time on."""
    body = {
        "effective_from": effective_from,
        "request_price_per_million": request_price_per_million,
        "gb_second_price": gb_second_price,
        "provisioned_gb_second_price": provisioned_gb_second_price,
        "provisioned_duration_gb_second_price": provisioned_duration_gb_second_price,
        "tiers": _tiers(tier),
        "free_requests": free_requests,
        "free_gb_seconds": free_gb_seconds,
        "bill_init": bill_init,
    }
    body = {k: v for k, v in body.items() if v is not None}
    _print_json(_call(url, key, "PATCH", f"/v1/plans/{name}", json=body).json())


@plans_cli.command("assign")
def plans_assign(
    tenant_id: str,
    plan: str,
    effective_from: Annotated[
        str | None, typer.Option("--from", help="A whole UTC minute; default: the next one")
    ] = None,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Put a tenant on a plan from a time on."""
    body = {"plan": plan, **({"effective_from": effective_from} if effective_from else {})}
    path = f"/v1/tenants/{tenant_id}/plan-assignments"
    _print_json(_call(url, key, "POST", path, json=body).json())


@plans_cli.command("assignments")
def plans_assignments(tenant_id: str, url: UrlOption = None, key: KeyOption = None) -> None:
    """A tenant's plan assignments."""
    _print_json(_call(url, key, "GET", f"/v1/tenants/{tenant_id}/plan-assignments").json())


# Invoices.


@invoices_cli.command("list")
def invoices_list(
    all_tenants: Annotated[
        bool, typer.Option("--all-tenants", help="Every tenant's (operator key)")
    ] = False,
    tenant: Annotated[str | None, typer.Option(help="With --all-tenants: only this one")] = None,
    period: Annotated[str | None, typer.Option(help="With --all-tenants: only YYYY-MM")] = None,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """Invoices, newest first, with their totals."""
    if all_tenants:
        params = {k: v for k, v in (("tenant_id", tenant), ("period", period)) if v}
        body = _call(url, key, "GET", "/v1/operator/invoices", params=params).json()
    else:
        body = _call(url, key, "GET", "/v1/invoices").json()
    table = Table("id", "period", "status", "requests", "billed ms", "total")
    for invoice in body["invoices"]:
        table.add_row(
            invoice["id"],
            invoice["period"],
            invoice["status"],
            str(invoice["requests"]),
            str(invoice["billed_ms"]),
            f"{invoice['total']} {invoice['currency']}",
        )
    console.print(table)


@invoices_cli.command("get")
def invoices_get(
    invoice_id: str,
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV instead of JSON")] = False,
    operator: Annotated[
        bool, typer.Option("--operator", help="Any tenant's (operator key)")
    ] = False,
    url: UrlOption = None,
    key: KeyOption = None,
) -> None:
    """One invoice with its lines."""
    base = "/v1/operator/invoices" if operator else "/v1/invoices"
    if csv:
        sys.stdout.write(_call(url, key, "GET", f"{base}/{invoice_id}.csv").text)
        return
    _print_json(_call(url, key, "GET", f"{base}/{invoice_id}").json())
