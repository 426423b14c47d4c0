"""The rollup job: per-minute and per-hour usage per function, recomputed from the records.

Why a job and not counters updated on the invoke path: an upsert of a (function, minute) row in
every invocation's transaction would make all concurrent invocations of a hot function queue on
that row's lock in PostgreSQL until each commits, and would lengthen every write transaction
SQLite serialises. The job instead reads records in bulk, after they have settled.

Crash safety and idempotence: a run advances the high-water mark (``usage_rollup_state``) in
the same transaction as the buckets it writes, after deleting whatever buckets already sit in
the range it covers. A run killed at any point leaves the previous state intact, and running
the same range twice writes the same buckets.

Settling: a minute is rolled up only once ``metering_settle_s`` have passed since it ended, so
that invocations which finished in it have committed their records. A record that commits later
than that (a stalled transaction) marks its hour in ``usage_late_hours`` in its own transaction
(see ``app.metering.recorder``), and the next run recomputes that hour's minutes and the hour
from the records. Reads never see a half-done job: the queries in
``app.metering.service`` take the high-water mark and the buckets in one statement.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.billing.periods import HOUR, MINUTE, floor_to
from app.logging import get_logger
from app.metering.models import LateHour, RollupState, UsageHour, UsageMinute, UsageRecord
from app.metering.service import hour_of, minute_of

log = get_logger(__name__)

# One transaction rolls up at most this much time, so a large backlog (after downtime, or a bulk
# import) is worked through in short transactions rather than one that blocks SQLite's writer.
MAX_STEP = timedelta(hours=6)
LATE_BATCH = 500


@dataclass
class RollupRun:
    minutes_to: datetime | None = None
    hours_to: datetime | None = None
    minutes_written: int = 0
    late_hours_fixed: int = 0


async def roll_up(
    engine: AsyncEngine, *, settle_s: float, now: datetime | None = None
) -> RollupRun:
    """Roll up everything that has settled; returns how far the rollups now reach."""
    run = RollupRun()
    target = floor_to((now or datetime.now(UTC)) - timedelta(seconds=settle_s), MINUTE)
    while True:
        async with engine.begin() as conn:
            minutes_to, hours_to = await _lock_state(conn, target)
            marks, fixed = await _fix_late_hours(conn, minutes_to, hours_to)
            run.late_hours_fixed += fixed
            step_to = min(target, minutes_to + MAX_STEP)
            # Late marks first, a batch per transaction; then the high-water mark moves.
            if not marks and step_to > minutes_to:
                run.minutes_written += await _roll_minutes(conn, minutes_to, step_to)
                new_hours_to = floor_to(step_to, HOUR)
                if new_hours_to > hours_to:
                    await _roll_hours(conn, hours_to, new_hours_to)
                await conn.execute(
                    update(RollupState)
                    .where(RollupState.id == 1)
                    .values(minutes_to=step_to, hours_to=max(hours_to, new_hours_to))
                )
                minutes_to, hours_to = step_to, max(hours_to, new_hours_to)
        run.minutes_to, run.hours_to = minutes_to, hours_to
        if not marks and minutes_to >= target:
            return run


async def _lock_state(conn: AsyncConnection, target: datetime) -> tuple[datetime, datetime]:
    """Take the job's lock (the state row) and read the high-water marks.

    Writing first makes SQLite take its write lock now rather than fail to upgrade a read
    later, and makes a second job in PostgreSQL wait here for the first.
    """
    now = datetime.now(UTC)
    touched = await conn.execute(
        update(RollupState).where(RollupState.id == 1).values(updated_at=now)
    )
    if touched.rowcount == 0:
        # First run: start where the records start, or at the target if there are none.
        first = await conn.scalar(select(func.min(UsageRecord.recorded_at)))
        start = floor_to(min(first, target), MINUTE) if first is not None else target
        await conn.execute(
            insert(RollupState).values(
                id=1, minutes_to=start, hours_to=floor_to(start, HOUR), updated_at=now
            )
        )
    state = (
        await conn.execute(
            select(RollupState.minutes_to, RollupState.hours_to).where(RollupState.id == 1)
        )
    ).one()
    return state.minutes_to, state.hours_to


def _minute_sums(dialect: str, start: datetime, end: datetime):  # type: ignore[no-untyped-def]
    r = UsageRecord
    minute = minute_of(r.recorded_at, dialect)
    return (
        select(
            r.tenant_id,
            minute,
            r.function_id,
            func.max(r.function_name),
            func.sum(r.requests),
            func.sum(r.billed_ms),
            func.sum(r.mb_ms),
            func.sum(r.init_billed_ms),
            func.sum(r.init_billed_ms * r.memory_mb),
        )
        .where(r.recorded_at >= start, r.recorded_at < end)
        .group_by(r.tenant_id, minute, r.function_id)
    )


ROLLUP_COLUMNS = [
    "tenant_id",
    "bucket_start",
    "function_id",
    "function_name",
    "requests",
    "billed_ms",
    "mb_ms",
    "init_billed_ms",
    "init_mb_ms",
]


async def _roll_minutes(conn: AsyncConnection, start: datetime, end: datetime) -> int:
    await conn.execute(
        delete(UsageMinute).where(UsageMinute.bucket_start >= start, UsageMinute.bucket_start < end)
    )
    result = await conn.execute(
        insert(UsageMinute).from_select(ROLLUP_COLUMNS, _minute_sums(conn.dialect.name, start, end))
    )
    return max(result.rowcount, 0)


def _hour_sums(dialect: str, where):  # type: ignore[no-untyped-def]
    m = UsageMinute
    hour = hour_of(m.bucket_start, dialect)
    return (
        select(
            m.tenant_id,
            hour,
            m.function_id,
            func.max(m.function_name),
            func.sum(m.requests),
            func.sum(m.billed_ms),
            func.sum(m.mb_ms),
            func.sum(m.init_billed_ms),
            func.sum(m.init_mb_ms),
        )
        .where(*where)
        .group_by(m.tenant_id, hour, m.function_id)
    )


async def _roll_hours(conn: AsyncConnection, start: datetime, end: datetime) -> None:
    await conn.execute(
        delete(UsageHour).where(UsageHour.bucket_start >= start, UsageHour.bucket_start < end)
    )
    where = [UsageMinute.bucket_start >= start, UsageMinute.bucket_start < end]
    await conn.execute(
        insert(UsageHour).from_select(ROLLUP_COLUMNS, _hour_sums(conn.dialect.name, where))
    )


async def _fix_late_hours(
    conn: AsyncConnection, minutes_to: datetime, hours_to: datetime
) -> tuple[int, int]:
    """Recompute hours (their minutes, then the hour) that got records after being rolled up.

    Returns how many marks were cleared and how many hours were recomputed.
    """
    late = (
        await conn.execute(
            select(LateHour.tenant_id, LateHour.function_id, LateHour.hour).limit(LATE_BATCH)
        )
    ).all()
    if not late:
        return 0, 0
    dialect = conn.dialect.name
    fixed = 0
    for tenant_id, function_id, hour in late:
        # Anything not yet rolled up will be by the normal run; only older minutes need it.
        until = min(hour + HOUR, minutes_to)
        if until > hour:
            m = UsageMinute
            await conn.execute(
                delete(m).where(
                    m.tenant_id == tenant_id,
                    m.function_id == function_id,
                    m.bucket_start >= hour,
                    m.bucket_start < until,
                )
            )
            sums = _minute_sums(dialect, hour, until).where(
                UsageRecord.tenant_id == tenant_id, UsageRecord.function_id == function_id
            )
            await conn.execute(insert(m).from_select(ROLLUP_COLUMNS, sums))
            fixed += 1
        if hour < hours_to:
            h = UsageHour
            await conn.execute(
                delete(h).where(
                    h.tenant_id == tenant_id, h.function_id == function_id, h.bucket_start == hour
                )
            )
            where = [
                UsageMinute.tenant_id == tenant_id,
                UsageMinute.function_id == function_id,
                UsageMinute.bucket_start >= hour,
                UsageMinute.bucket_start < hour + HOUR,
            ]
            await conn.execute(insert(h).from_select(ROLLUP_COLUMNS, _hour_sums(dialect, where)))
        await conn.execute(
            delete(LateHour).where(
                LateHour.tenant_id == tenant_id,
                LateHour.function_id == function_id,
                LateHour.hour == hour,
            )
        )
    if fixed:
        log.info("late usage rolled up again", hours=fixed)
    return len(late), fixed
