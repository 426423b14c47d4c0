"""Metering: what each invocation is billed, and usage over any window.

Durations are measured in nanoseconds and billed in whole milliseconds, rounded up: 0.2 ms bills
1 ms, 12.0001 ms bills 13 ms, exactly 12 ms bills 12 ms. Usage is weighted by memory as
GB-seconds = billed ms / 1,000 × memory MB / 1,024, kept exact as integer MB-milliseconds.

Usage over a window is read in one statement from three sources that never overlap: per-hour
rollups for the whole hours the rollup job has finished, per-minute rollups for the other whole
minutes it has finished, and the usage records themselves for the rest (the open tail since the
job last ran, and the window's ragged edges). One statement means one snapshot, so a rollup job
committing meanwhile can neither hide a record nor count it twice.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    exists,
    func,
    literal,
    literal_column,
    select,
    type_coerce,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.selectable import Join

from app.billing.periods import EPOCH, HOUR, MINUTE, ceil_to, floor_to
from app.billing.pricing import Usage
from app.db import UTCDateTime
from app.metering.models import LateHour, RollupState, UsageHour, UsageMinute, UsageRecord
from app.tenants.scope import TenantScope

NS_PER_MS = 1_000_000
MB_MS_PER_GB_SECOND = 1_024_000  # 1,024 MB × 1,000 ms
DAY = timedelta(days=1)
Granularity = Literal["minute", "hour", "day"]
GRANULARITY_STEP: dict[str, timedelta] = {"minute": MINUTE, "hour": HOUR, "day": DAY}


def billed_ms(duration_ns: int) -> int:
    """Whole milliseconds billed for a duration: rounded up, never less than what ran."""
    if duration_ns <= 0:
        return 0
    return -(-duration_ns // NS_PER_MS)


def gb_seconds(mb_ms: int) -> Decimal:
    return Decimal(mb_ms) / Decimal(MB_MS_PER_GB_SECOND)


def minute_of(column: Any, dialect: str) -> ColumnElement[datetime]:
    """The start of the UTC minute a timestamp column falls in, as SQL.

    Constants are literal, not bound, so PostgreSQL sees the same expression in SELECT and
    GROUP BY. On SQLite a timestamp is the text 'YYYY-MM-DD HH:MM:SS.ffffff' (SQLAlchemy's
    storage format), so truncating the text is exact.
    """
    if dialect == "sqlite":
        expr = func.substr(column, 1, 16).concat(literal_column("':00.000000'"))
    else:
        utc = literal_column("'UTC'")
        expr = func.timezone(
            utc, func.date_trunc(literal_column("'minute'"), func.timezone(utc, column))
        )
    return type_coerce(expr, UTCDateTime())


def hour_of(column: Any, dialect: str) -> ColumnElement[datetime]:
    if dialect == "sqlite":
        expr = func.substr(column, 1, 13).concat(literal_column("':00:00.000000'"))
    else:
        utc = literal_column("'UTC'")
        expr = func.timezone(
            utc, func.date_trunc(literal_column("'hour'"), func.timezone(utc, column))
        )
    return type_coerce(expr, UTCDateTime())


def _state(column: Any) -> ColumnElement[datetime]:
    # No state row yet means nothing is rolled up: everything comes from the records.
    return func.coalesce(
        select(column).where(RollupState.id == 1).scalar_subquery(), literal(EPOCH, UTCDateTime())
    )


def _scoped(model: Any, tenant_id: str | None, *columns: Any) -> Select[Any]:
    if tenant_id is None:  # the operator's view across tenants
        return select(*columns)
    return TenantScope(tenant_id).select(model, *columns)


USAGE_COLUMNS = ("requests", "billed_ms", "mb_ms", "init_billed_ms", "init_mb_ms")


class MarksFirst(Join):
    """A join that walks its left side (the few late marks) and seeks into its right.

    SQLite's planner, without statistics, takes the equality on the records' tenant for
    selective and would walk every record of the tenant instead; a CROSS JOIN is how SQLite
    is told the loop order. PostgreSQL plans from statistics and gets a plain JOIN.
    """

    inherit_cache = True


@compiles(MarksFirst, "sqlite")
def _marks_first_on_sqlite(join: MarksFirst, compiler: Any, **kw: Any) -> str:
    kw["asfrom"] = True
    left = compiler.process(join.left, **kw)
    right = compiler.process(join.right, **kw)
    return f"{left} CROSS JOIN {right} ON {compiler.process(join.onclause, **kw)}"


def _unmarked(model: Any, hour: Any) -> ColumnElement[bool]:
    """No late mark makes this bucket's hour stale."""
    late = LateHour
    return ~exists().where(
        late.tenant_id == model.tenant_id, late.function_id == model.function_id, late.hour == hour
    )


def usage_query(
    dialect: str,
    start: datetime,
    end: datetime,
    *,
    tenant_id: str | None = None,
    keyed: Literal[None, "minute", "hour"] = None,
) -> Select[Any]:
    """Sums per (tenant, function) — and per time key when ``keyed`` — over [start, end).

    With ``keyed="minute"`` every row's key is a minute; with ``"hour"``, rows from hour rollups
    are keyed by their hour and the rest by minute (the caller floors them further).

    Four parts, which never overlap: hour rollups for whole rolled-up hours; minute rollups for
    the rolled-up minutes around them (the window's ragged hours, and the hours the job has not
    finished); the records of everything else; and the records of hours marked late, whose
    rollups are stale until the job redoes them. Every part is a few index ranges, so a month's
    invoice reads some hundreds of rows per function, not its records.
    """
    minutes_to, hours_to = _state(RollupState.minutes_to), _state(RollupState.hours_to)
    m_a, m_b = ceil_to(start, MINUTE), floor_to(end, MINUTE)
    h_a, h_b = ceil_to(start, HOUR), floor_to(end, HOUR)
    use_minutes = m_a < m_b
    use_hours = keyed != "minute" and h_a < h_b
    late = LateHour

    def rollup_part(model: Any, where: list[Any]) -> Select[Any]:
        key = [model.bucket_start.label("bucket")] if keyed else []
        return _scoped(
            model,
            tenant_id,
            model.tenant_id,
            model.function_id,
            model.function_name,
            *key,
            *(getattr(model, c).label(c) for c in USAGE_COLUMNS),
        ).where(*where)

    def records_part() -> Select[Any]:
        r = UsageRecord
        return _scoped(
            r,
            tenant_id,
            r.tenant_id,
            r.function_id,
            r.function_name,
            *([minute_of(r.recorded_at, dialect).label("bucket")] if keyed else []),
            r.requests.label("requests"),
            r.billed_ms.label("billed_ms"),
            r.mb_ms.label("mb_ms"),
            r.init_billed_ms.label("init_billed_ms"),
            (r.init_billed_ms * r.memory_mb).label("init_mb_ms"),
        )

    def later_of(a: Any, b: datetime) -> ColumnElement[datetime]:
        name = "max" if dialect == "sqlite" else "greatest"
        return type_coerce(getattr(func, name)(a, literal(b, UTCDateTime())), UTCDateTime())

    # Each range is its own branch: both databases then seek the index to it, where an OR of
    # ranges may make SQLite scan every row of the tenant.
    parts = []
    h, m = UsageHour, UsageMinute
    if use_hours:
        parts.append(
            rollup_part(
                h,
                [
                    h.bucket_start >= h_a,
                    h.bucket_start < h_b,
                    h.bucket_start < hours_to,
                    _unmarked(h, h.bucket_start),
                ],
            )
        )
    if use_minutes:
        at = m.bucket_start
        fresh = [at < minutes_to, _unmarked(m, hour_of(at, dialect))]
        if use_hours:
            # The ragged hours at both ends, and the whole hours not rolled up into hours yet.
            parts.append(rollup_part(m, [at >= m_a, at < h_a, *fresh]))
            parts.append(rollup_part(m, [at >= h_b, at < m_b, *fresh]))
            parts.append(rollup_part(m, [at >= later_of(hours_to, h_a), at < h_b, *fresh]))
        else:
            parts.append(rollup_part(m, [at >= m_a, at < m_b, *fresh]))

    at = UsageRecord.recorded_at
    if use_minutes:
        # The ragged minutes at both ends, and whatever the job has not rolled up yet.
        parts.append(records_part().where(at >= start, at < m_a))
        parts.append(records_part().where(at >= m_b, at < end))
        parts.append(records_part().where(at >= later_of(minutes_to, m_a), at < m_b))
        # Hours marked late: their records, where the rollups would otherwise have been read.
        on = and_(
            late.tenant_id == UsageRecord.tenant_id,
            late.function_id == UsageRecord.function_id,
            at >= late.hour,
            at < late.until,
        )
        parts.append(
            records_part()
            .select_from(MarksFirst(LateHour.__table__, UsageRecord.__table__, on))
            .where(at >= m_a, at < m_b, at < minutes_to)
        )
    else:
        parts.append(records_part().where(at >= start, at < end))

    union = union_all(*parts).subquery()
    groups = [union.c.tenant_id, union.c.function_id, union.c.function_name]
    if keyed:
        groups.append(union.c.bucket)
    return select(*groups, *(func.sum(union.c[c]) for c in USAGE_COLUMNS)).group_by(*groups)


def _usage(values: Any) -> Usage:
    return Usage(*(int(v or 0) for v in values))


@dataclass(frozen=True)
class FunctionTotal:
    tenant_id: str
    function_id: str
    function_name: str
    usage: Usage


async def usage_totals(
    conn: AsyncSession | AsyncConnection,
    start: datetime,
    end: datetime,
    *,
    tenant_id: str | None = None,
) -> list[FunctionTotal]:
    """Per-function sums over [start, end), from rollups and the records' open tail."""
    if start >= end:
        return []
    query = usage_query(_dialect(conn), start, end, tenant_id=tenant_id)
    rows = (await conn.execute(query)).all()
    return [FunctionTotal(row[0], row[1], row[2], _usage(row[3:])) for row in rows]


async def usage_series(
    conn: AsyncSession | AsyncConnection,
    start: datetime,
    end: datetime,
    granularity: Granularity,
    *,
    tenant_id: str | None = None,
) -> dict[tuple[str, str], list[tuple[datetime, Usage]]]:
    """(tenant id, function name) → [(bucket start, usage)], buckets in time order, sparse."""
    if start >= end:
        return {}
    keyed: Literal["minute", "hour"] = "minute" if granularity == "minute" else "hour"
    query = usage_query(_dialect(conn), start, end, tenant_id=tenant_id, keyed=keyed)
    step = GRANULARITY_STEP[granularity]
    buckets: dict[tuple[str, str], dict[datetime, Usage]] = defaultdict(dict)
    for row in (await conn.execute(query)).all():
        tenant, _, name, key = row[0], row[1], row[2], row[3]
        bucket = floor_to(max(key, start), step)
        series = buckets[(tenant, name)]
        series[bucket] = series.get(bucket, Usage()) + _usage(row[4:])
    return {k: sorted(v.items()) for k, v in buckets.items()}


def _dialect(conn: AsyncSession | AsyncConnection) -> str:
    bind = conn.bind if isinstance(conn, AsyncSession) else conn
    return bind.dialect.name


@dataclass(frozen=True)
class UsageRow:
    function: str
    requests: int
    billed_ms: int
    mb_ms: int


async def usage_by_function(
    session: AsyncSession, tenant_id: str, start: datetime, end: datetime
) -> list[UsageRow]:
    """The tenant's usage per function name over [start, end), names in order."""
    merged: dict[str, Usage] = defaultdict(Usage)
    for total in await usage_totals(session, start, end, tenant_id=tenant_id):
        merged[total.function_name] += total.usage
    return [UsageRow(name, u.requests, u.billed_ms, u.mb_ms) for name, u in sorted(merged.items())]


async def raw_totals(
    conn: AsyncSession | AsyncConnection,
    start: datetime,
    end: datetime,
    *,
    tenant_id: str | None = None,
) -> list[FunctionTotal]:
    """Per-function sums straight from the usage records, for reconciliation."""
    r = UsageRecord
    query = (
        _scoped(
            r,
            tenant_id,
            r.tenant_id,
            r.function_id,
            r.function_name,
            func.sum(r.requests),
            func.sum(r.billed_ms),
            func.sum(r.mb_ms),
            func.sum(r.init_billed_ms),
            func.sum(r.init_billed_ms * r.memory_mb),
        )
        .where(r.recorded_at >= start, r.recorded_at < end)
        .group_by(r.tenant_id, r.function_id, r.function_name)
    )
    rows = (await conn.execute(query)).all()
    return [FunctionTotal(row[0], row[1], row[2], _usage(row[3:])) for row in rows]
