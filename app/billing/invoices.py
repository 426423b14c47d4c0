"""Invoices: a tenant's usage in a billing period, priced by its plans.

An invoice for the current period is computed when asked for: a running total. Once a period
has ended and ``metering_settle_s`` has passed (so that every invocation that finished in it has
its usage record), its invoice is finalised: computed one last time, stored with its lines, and
from then on only ever read. Finalisation happens when such an invoice is first read, and in
the background (``app.billing.runtime``).

An invoice's id is derived from its tenant and period, so the open invoice has the id it will
keep when finalised.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.billing.models import Invoice, InvoiceLine, ProvisionedConcurrencyChange
from app.billing.money import round_to_minor_unit
from app.billing.periods import Period, periods_between
from app.billing.pricing import (
    FunctionUsage,
    Line,
    LineKind,
    Priced,
    Segment,
    Usage,
    price_period,
)
from app.billing.provisioned import BLOCK_MS, load_changes, provisioned_blocks
from app.billing.service import DEFAULT_TERMS, plan_timeline
from app.errors import ResourceNotFound
from app.logging import get_logger
from app.metering.models import UsageHour, UsageRecord
from app.metering.service import raw_totals, usage_totals
from app.tenants.models import Tenant
from app.tenants.scope import TenantScope

log = get_logger(__name__)

Source = Literal["rollups", "records"]


class InvoiceNotFound(ResourceNotFound):
    pass


def invoice_id(tenant_id: str, period: Period) -> str:
    return f"inv-{period.start:%Y%m}-{tenant_id}"


def parse_invoice_id(text: str) -> tuple[str, Period]:
    try:
        prefix, month, tenant_id = text.split("-", 2)
        if prefix != "inv" or len(month) != 6 or not tenant_id:
            raise ValueError(text)
        return tenant_id, Period.parse(f"{month[:4]}-{month[4:]}")
    except ValueError:
        raise InvoiceNotFound(f"invoice {text!r} does not exist") from None


@dataclass
class InvoiceView:
    """An invoice as the API shows it: stored (final) or computed now (open)."""

    id: str
    tenant_id: str
    period: Period
    status: Literal["open", "final"]
    currency: str
    minor_units: int
    plans: list[str]
    lines: list[Line]
    total: Decimal
    exact_total: Decimal
    requests: int
    billed_ms: int
    finalised_at: datetime | None
    computed_at: datetime


async def compute(
    session: AsyncSession,
    tenant_id: str,
    period: Period,
    now: datetime,
    *,
    source: Source = "rollups",
) -> Priced:
    """Price the tenant's usage in ``period`` as of ``now``.

    ``source="records"`` reads the usage records alone, bypassing the rollups; reconciliation
    compares the two.
    """
    spans = await plan_timeline(session, tenant_id, period)
    horizon = min(now, period.end)
    provisioned = provisioned_blocks(
        await load_changes(session, tenant_id, horizon), period.start, horizon
    )

    # Cut the period wherever the plan changes or any function's provisioned state does, so
    # that within each piece every function is either provisioned throughout or not at all.
    cuts = {s.start for s in spans} | {period.end}
    runs = {fid: fn.runs() for fid, fn in provisioned.items()}
    for function_runs in runs.values():
        for start, end in function_runs:
            cuts.update(c for c in (start, end) if period.start <= c <= period.end)
    bounds = sorted(cuts)

    def span_index(at: datetime) -> int:
        return next(i for i, s in enumerate(spans) if s.start <= at < s.end)

    names: dict[str, str] = {}
    on_demand: dict[tuple[int, str], Usage] = defaultdict(Usage)
    while_provisioned: dict[tuple[int, str], Usage] = defaultdict(Usage)
    concurrency_mb_ms: dict[tuple[int, str], int] = defaultdict(int)
    read = usage_totals if source == "rollups" else raw_totals
    for start, end in zip(bounds, bounds[1:], strict=False):
        i = span_index(start)
        for total in await read(session, start, end, tenant_id=tenant_id):
            names[total.function_id] = total.function_name
            key = (i, total.function_id)
            if any(a <= start < b for a, b in runs.get(total.function_id, ())):
                while_provisioned[key] += total.usage
            else:
                on_demand[key] += total.usage
    for function_id, fn in provisioned.items():
        names.setdefault(function_id, fn.function_name)
        for block, mb in fn.blocks.items():
            concurrency_mb_ms[(span_index(block), function_id)] += mb * BLOCK_MS

    segments = []
    keys = set(on_demand) | set(while_provisioned) | set(concurrency_mb_ms)
    for i, span in enumerate(spans):
        functions = tuple(
            FunctionUsage(
                function_id=fid,
                function_name=names[fid],
                on_demand=on_demand.get((i, fid), Usage()),
                provisioned=while_provisioned.get((i, fid), Usage()),
                provisioned_concurrency_mb_ms=concurrency_mb_ms.get((i, fid), 0),
            )
            for (j, fid) in sorted(keys)
            if j == i
        )
        segments.append(Segment(span.start, span.end, span.terms, functions))
    return price_period(segments, DEFAULT_TERMS)


def finalisable(period: Period, now: datetime, settle_s: float) -> bool:
    return now >= period.end + timedelta(seconds=settle_s)


def _view_of_stored(invoice: Invoice) -> InvoiceView:
    lines = [
        Line(
            function_name=row.function_name,
            kind=LineKind(row.kind),
            requests=row.requests,
            billed_ms=row.billed_ms,
            init_billed_ms=row.init_billed_ms,
            gb_seconds=row.gb_seconds,
            free_requests=row.free_requests,
            free_gb_seconds=row.free_gb_seconds,
            exact_amount=row.exact_amount,
            amount=row.amount,
        )
        for row in invoice.lines
    ]
    return InvoiceView(
        id=invoice.id,
        tenant_id=invoice.tenant_id,
        period=Period.containing(invoice.period_start),
        status="final",
        currency=invoice.currency,
        minor_units=invoice.minor_units,
        plans=list(invoice.plans),
        lines=lines,
        total=invoice.total,
        exact_total=invoice.exact_total,
        requests=invoice.requests,
        billed_ms=invoice.billed_ms,
        finalised_at=invoice.finalised_at,
        computed_at=invoice.finalised_at,
    )


def _view_of_priced(tenant_id: str, period: Period, priced: Priced, now: datetime) -> InvoiceView:
    return InvoiceView(
        id=invoice_id(tenant_id, period),
        tenant_id=tenant_id,
        period=period,
        status="open",
        currency=priced.currency,
        minor_units=priced.minor_units,
        plans=priced.plans,
        lines=priced.lines,
        total=round_to_minor_unit(priced.total, priced.minor_units),
        exact_total=priced.exact_total,
        requests=priced.requests,
        billed_ms=priced.billed_ms,
        finalised_at=None,
        computed_at=now,
    )


async def stored_invoice(session: AsyncSession, tenant_id: str, period: Period) -> Invoice | None:
    return await session.scalar(
        TenantScope(tenant_id).select(Invoice).where(Invoice.period_start == period.start)
    )


async def finalise(
    session: AsyncSession, tenant_id: str, period: Period, now: datetime
) -> InvoiceView:
    """Store the period's invoice for good (or return it if it already is)."""
    existing = await stored_invoice(session, tenant_id, period)
    if existing is not None:
        return _view_of_stored(existing)

    priced = await compute(session, tenant_id, period, period.end)
    invoice = Invoice(
        id=invoice_id(tenant_id, period),
        tenant_id=tenant_id,
        period_start=period.start,
        period_end=period.end,
        currency=priced.currency,
        minor_units=priced.minor_units,
        plans=priced.plans,
        requests=priced.requests,
        billed_ms=priced.billed_ms,
        total=round_to_minor_unit(priced.total, priced.minor_units),
        exact_total=priced.exact_total,
        finalised_at=now,
        lines=[
            InvoiceLine(
                position=i,
                function_name=line.function_name,
                kind=line.kind.value,
                requests=line.requests,
                billed_ms=line.billed_ms,
                init_billed_ms=line.init_billed_ms,
                gb_seconds=line.gb_seconds,
                free_requests=line.free_requests,
                free_gb_seconds=line.free_gb_seconds,
                exact_amount=line.exact_amount,
                amount=line.amount,
            )
            for i, line in enumerate(priced.lines)
        ],
    )
    session.add(invoice)
    try:
        await session.commit()
    except IntegrityError:  # finalised meanwhile by another request or process
        await session.rollback()
        existing = await stored_invoice(session, tenant_id, period)
        assert existing is not None
        return _view_of_stored(existing)
    log.info(
        "invoice finalised",
        tenant_id=tenant_id,
        period=period.label,
        total=str(invoice.total),
        currency=invoice.currency,
    )
    return _view_of_stored(invoice)


async def first_period(session: AsyncSession, tenant_id: str) -> Period | None:
    """The tenant's first billing period: when it was created, used or provisioned anything."""
    candidates = [
        await session.scalar(select(Tenant.created_at).where(Tenant.id == tenant_id)),
        await session.scalar(
            TenantScope(tenant_id).select(UsageRecord, func.min(UsageRecord.recorded_at))
        ),
        await session.scalar(
            TenantScope(tenant_id).select(
                ProvisionedConcurrencyChange, func.min(ProvisionedConcurrencyChange.at)
            )
        ),
    ]
    known = [c for c in candidates if c is not None]
    return Period.containing(min(known)) if known else None


async def get_invoice(
    session: AsyncSession, tenant_id: str, period: Period, now: datetime, settle_s: float
) -> InvoiceView:
    """One invoice: stored if final, finalised now if due, else computed as it stands."""
    first = await first_period(session, tenant_id)
    if first is None or period < first or period.start > now:
        raise InvoiceNotFound(f"invoice {invoice_id(tenant_id, period)!r} does not exist")
    if finalisable(period, now, settle_s):
        return await finalise(session, tenant_id, period, now)
    priced = await compute(session, tenant_id, period, now)
    return _view_of_priced(tenant_id, period, priced, now)


async def list_invoices(
    session: AsyncSession, tenant_id: str, now: datetime, settle_s: float
) -> list[InvoiceView]:
    """Every invoice of the tenant, newest first, finalising those that are due."""
    first = await first_period(session, tenant_id)
    current = Period.containing(now)
    if first is None:
        return []
    stored = {
        inv.period_start: inv
        for inv in (await session.execute(TenantScope(tenant_id).select(Invoice))).scalars()
    }
    views = []
    for period in reversed(periods_between(first, current)):
        if period.start in stored:
            views.append(_view_of_stored(stored[period.start]))
        elif finalisable(period, now, settle_s):
            views.append(await finalise(session, tenant_id, period, now))
        else:
            priced = await compute(session, tenant_id, period, now)
            views.append(_view_of_priced(tenant_id, period, priced, now))
    return views


async def billed_tenants(session: AsyncSession) -> list[str]:
    """Every tenant that has or had something to bill, deleted ones included."""
    ids: set[str] = set((await session.execute(select(Tenant.id))).scalars())
    ids.update((await session.execute(select(UsageHour.tenant_id).distinct())).scalars())
    ids.update(
        (await session.execute(select(ProvisionedConcurrencyChange.tenant_id).distinct())).scalars()
    )
    return sorted(ids)


async def finalise_due(session: AsyncSession, now: datetime, settle_s: float) -> int:
    """Finalise every invoice whose period has ended and settled; returns how many."""
    done = 0
    for tenant_id in await billed_tenants(session):
        first = await first_period(session, tenant_id)
        if first is None:
            continue
        stored = set(
            (
                await session.execute(TenantScope(tenant_id).select(Invoice, Invoice.period_start))
            ).scalars()
        )
        for period in periods_between(first, Period.containing(now)):
            if period.start not in stored and finalisable(period, now, settle_s):
                await finalise(session, tenant_id, period, now)
                done += 1
    return done


async def list_all_invoices(
    session: AsyncSession,
    now: datetime,
    settle_s: float,
    *,
    period: Period | None = None,
) -> list[InvoiceView]:
    """The operator's view: every tenant's invoices (final and open), newest first."""
    await finalise_due(session, now, settle_s)
    query = select(Invoice).order_by(Invoice.period_start.desc(), Invoice.tenant_id)
    if period is not None:
        query = query.where(Invoice.period_start == period.start)
    views = [_view_of_stored(inv) for inv in (await session.execute(query)).scalars()]

    current = Period.containing(now)
    open_periods = [
        p
        for p in (current.previous(), current)
        if not finalisable(p, now, settle_s) and period in (None, p)
    ]
    for open_period in open_periods:
        active = {t.tenant_id for t in await usage_totals(session, open_period.start, now)}
        tenants = set((await session.execute(select(Tenant.id))).scalars()) | active
        for tenant_id in sorted(tenants):
            first = await first_period(session, tenant_id)
            if first is None or open_period < first:
                continue
            priced = await compute(session, tenant_id, open_period, now)
            views.append(_view_of_priced(tenant_id, open_period, priced, now))
    views.sort(key=lambda v: (v.period.start, v.tenant_id), reverse=True)
    return views
