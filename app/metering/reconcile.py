"""Reconciliation: usage records, rollups and invoices must tell the same story.

For each billing period and tenant it checks, to the millisecond and to the cent:

1. every usage record has its invocation row and every invocation row its usage record;
2. the per-minute rollups equal the records they cover, and the per-hour rollups the minutes;
3. usage as the API reads it (rollups plus the records' open tail) equals the records' sums;
4. the invoice computed from rollups equals the invoice computed from the records alone, and a
   finalised invoice equals both;
5. the invoice's requests, billed milliseconds and GB-seconds equal the records' sums.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.billing.invoices import compute, stored_invoice
from app.billing.money import exact, format_exact
from app.billing.periods import Period
from app.billing.pricing import LineKind, Priced, Usage, gb_seconds
from app.billing.service import plan_timeline
from app.invocations.models import Invocation
from app.metering.models import RollupState, UsageHour, UsageMinute, UsageRecord
from app.metering.service import USAGE_COLUMNS, hour_of, raw_totals, usage_totals


@dataclass(frozen=True)
class Check:
    period: str
    tenant_id: str
    what: str
    expected: str
    actual: str

    @property
    def ok(self) -> bool:
        return self.expected == self.actual


def _by_function(totals: list) -> dict[tuple[str, str], Usage]:  # type: ignore[type-arg]
    merged: dict[tuple[str, str], Usage] = defaultdict(Usage)
    for t in totals:
        merged[(t.tenant_id, t.function_id)] += t.usage
    return merged


def _usage_text(usage: Usage) -> str:
    return (
        f"{usage.requests} req, {usage.billed_ms} ms, {usage.mb_ms} MB-ms, "
        f"init {usage.init_billed_ms} ms / {usage.init_mb_ms} MB-ms"
    )


def _invoice_text(priced: Priced) -> list[str]:
    return [
        f"{line.function_name}/{line.kind.value}: {line.requests} req {line.billed_ms} ms "
        f"{format_exact(line.gb_seconds)} GB-s {format_exact(line.exact_amount)} → {line.amount}"
        for line in priced.lines
    ] + [f"total {priced.total} {priced.currency}"]


async def _orphans(session: AsyncSession, tenant_id: str, period: Period) -> tuple[int, int]:
    u, i = UsageRecord, Invocation
    usage_only = await session.scalar(
        select(func.count())
        .select_from(u)
        .outerjoin(i, i.request_id == u.request_id)
        .where(u.tenant_id == tenant_id, u.recorded_at >= period.start, u.recorded_at < period.end)
        .where(i.request_id.is_(None))
    )
    invocation_only = await session.scalar(
        select(func.count())
        .select_from(i)
        .outerjoin(u, u.request_id == i.request_id)
        .where(i.tenant_id == tenant_id, i.finished_at >= period.start, i.finished_at < period.end)
        .where(u.request_id.is_(None))
    )
    return int(usage_only or 0), int(invocation_only or 0)


async def _rollup_sums(
    session: AsyncSession,
    model: type[UsageMinute] | type[UsageHour],
    start: datetime,
    end: datetime,
    *,
    per_hour: bool = False,
) -> dict[tuple[Any, ...], Usage]:
    """A rollup table summed per (tenant, function), or per (tenant, function, hour)."""
    keys: list[Any] = [model.tenant_id, model.function_id]
    if per_hour:
        keys.append(hour_of(model.bucket_start, session.bind.dialect.name))
    rows = (
        await session.execute(
            select(*keys, *(func.sum(getattr(model, c)) for c in USAGE_COLUMNS))
            .where(model.bucket_start >= start, model.bucket_start < end)
            .group_by(*keys)
        )
    ).all()
    n = len(keys)
    return {tuple(r[:n]): Usage(*(int(v) for v in r[n:])) for r in rows}


async def _rollup_checks(session: AsyncSession, period: Period) -> list[Check]:
    """Rollups against what they summarise, over the part of the period they cover."""
    state = (
        await session.execute(select(RollupState.minutes_to, RollupState.hours_to))
    ).one_or_none()
    if state is None:
        return []
    checks = []
    minutes_end = min(period.end, state.minutes_to)
    if minutes_end > period.start:
        minutes = await _rollup_sums(session, UsageMinute, period.start, minutes_end)
        records = _by_function(await raw_totals(session, period.start, minutes_end))
        for key in sorted(set(minutes) | set(records)):
            checks.append(
                Check(
                    period.label,
                    key[0],
                    f"minute rollups = records, function {key[1]}",
                    _usage_text(records.get(key, Usage())),
                    _usage_text(minutes.get(key, Usage())),
                )
            )

    hours_end = min(period.end, state.hours_to)
    if hours_end > period.start:
        hours = await _rollup_sums(session, UsageHour, period.start, hours_end, per_hour=True)
        by_hour = await _rollup_sums(session, UsageMinute, period.start, hours_end, per_hour=True)
        for key in sorted(set(hours) | set(by_hour)):
            checks.append(
                Check(
                    period.label,
                    key[0],
                    f"hour rollup = its minutes, function {key[1]} at {key[2]:%Y-%m-%d %H:00}",
                    _usage_text(by_hour.get(key, Usage())),
                    _usage_text(hours.get(key, Usage())),
                )
            )
    return checks


async def reconcile_period(
    session: AsyncSession, period: Period, now: datetime, *, tenant_id: str | None = None
) -> list[Check]:
    """Every check of one period, for one tenant or for all with usage in it."""
    horizon = min(now, period.end)
    checks = [] if tenant_id else await _rollup_checks(session, period)
    records = _by_function(await raw_totals(session, period.start, horizon, tenant_id=tenant_id))
    read = _by_function(await usage_totals(session, period.start, horizon, tenant_id=tenant_id))
    for key in sorted(set(records) | set(read)):
        checks.append(
            Check(
                period.label,
                key[0],
                f"usage read = records, function {key[1]}",
                _usage_text(records.get(key, Usage())),
                _usage_text(read.get(key, Usage())),
            )
        )

    tenants = {tenant_id} if tenant_id else {t for t, _ in records}
    for tenant in sorted(tenants):
        usage_only, invocation_only = await _orphans(session, tenant, period)
        checks.append(
            Check(period.label, tenant, "usage records without invocation", "0", str(usage_only))
        )
        checks.append(
            Check(
                period.label, tenant, "invocations without usage record", "0", str(invocation_only)
            )
        )

        from_records = await compute(session, tenant, period, horizon, source="records")
        from_rollups = await compute(session, tenant, period, horizon, source="rollups")
        checks.append(
            Check(
                period.label,
                tenant,
                "invoice from rollups = invoice from records",
                "\n".join(_invoice_text(from_records)),
                "\n".join(_invoice_text(from_rollups)),
            )
        )
        stored = await stored_invoice(session, tenant, period)
        if stored is not None:
            checks.append(
                Check(
                    period.label,
                    tenant,
                    "finalised invoice = invoice from records",
                    f"total {from_records.total} {from_records.currency}, "
                    f"{from_records.requests} req, {from_records.billed_ms} ms",
                    f"total {stored.total} {stored.currency}, "
                    f"{stored.requests} req, {stored.billed_ms} ms",
                )
            )

        # The invoice against the records' own sums.
        tenant_usage = sum((u for (t, _), u in records.items() if t == tenant), Usage())
        checks.append(
            Check(
                period.label,
                tenant,
                "invoice requests and billed ms = records",
                f"{tenant_usage.requests} req, {tenant_usage.billed_ms} ms",
                f"{from_rollups.requests} req, {from_rollups.billed_ms} ms",
            )
        )
        expected_gbs = Decimal(0)
        for span in await plan_timeline(session, tenant, period):
            if span.start >= horizon:
                break
            span_usage = sum(
                (
                    t.usage
                    for t in await raw_totals(
                        session, span.start, min(span.end, horizon), tenant_id=tenant
                    )
                ),
                Usage(),
            )
            init = span_usage.init_mb_ms if span.terms.bill_init else 0
            with exact():
                expected_gbs += gb_seconds(span_usage.mb_ms + init)
        with exact():
            charged_gbs = sum(
                (
                    line.gb_seconds
                    for line in from_rollups.lines
                    if line.kind is not LineKind.PROVISIONED_CONCURRENCY
                ),
                Decimal(0),
            )
        checks.append(
            Check(
                period.label,
                tenant,
                "invoice duration GB-seconds = records",
                format_exact(expected_gbs),
                format_exact(charged_gbs),
            )
        )
    return checks
