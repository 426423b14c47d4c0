"""The rollup job, usage reads and reconciliation against a real database (SQLite, PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import func, select, update

from app.billing.invoices import compute, finalise, stored_invoice
from app.billing.periods import HOUR, MINUTE, Period, floor_to
from app.billing.pricing import Usage
from app.billing.service import ensure_default_plan
from app.db import Database
from app.metering import recorder, rollups
from app.metering.models import LateHour, RollupState, UsageHour, UsageMinute, UsageRecord
from app.metering.reconcile import reconcile_period
from app.metering.service import raw_totals, usage_series, usage_totals
from app.settings import Settings
from tests.billing_support import fresh_database, usage_row, with_db, write_usage

NOW = datetime.now(UTC)
# A window far enough back to be rolled up, in the previous billing period.
BASE = floor_to(Period.containing(NOW).previous().start + timedelta(days=3, hours=5), HOUR)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    with fresh_database(request.param, tmp_path_factory.mktemp("rollups")) as url:
        with_db(url, _default_plan)
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def own_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of the test's own, for tests that steer the rollup job's high-water mark."""
    with fresh_database(request.param, tmp_path) as url:
        with_db(url, _default_plan)
        yield url


async def _default_plan(db: Database) -> None:
    async with db.sessionmaker() as session:
        await ensure_default_plan(session)


def spread(tenant_id: str, start: datetime, minutes: int, per_minute: int) -> list[dict[str, Any]]:
    """Records every few seconds over ``minutes`` minutes, across three functions."""
    rows = []
    for m in range(minutes):
        for i in range(per_minute):
            at = start + m * MINUTE + timedelta(seconds=i * 59 / per_minute, microseconds=7)
            function = ("alpha", "beta", "gamma")[(m + i) % 3]
            rows.append(
                usage_row(
                    tenant_id,
                    function,
                    at,
                    billed_ms=1 + (m * 7 + i * 13) % 900,
                    memory_mb=(128, 512, 1769)[i % 3],
                    init_billed_ms=(i % 5 == 0) * 250,
                )
            )
    return rows


def totals_by_function(rows: list[Any]) -> dict[str, Usage]:
    result: dict[str, Usage] = {}
    for row in rows:
        result[row.function_id] = result.get(row.function_id, Usage()) + row.usage
    return result


def run(url: str, action: Any) -> Any:
    return with_db(url, action)


def roll(url: str, *, now: datetime | None = None) -> rollups.RollupRun:
    return run(url, lambda db: rollups.roll_up(db.engine, settle_s=0, now=now))


def test_rollups_equal_the_records_they_summarise(db_url: str) -> None:
    tenant = "t-summarise"
    write = spread(tenant, BASE, minutes=130, per_minute=4)
    run(db_url, lambda db: write_usage(db, write))

    roll(db_url)

    async def check(db: Database) -> None:
        async with db.sessionmaker() as session:
            start, end = BASE, BASE + 130 * MINUTE
            raw = totals_by_function(await raw_totals(session, start, end, tenant_id=tenant))
            read = totals_by_function(await usage_totals(session, start, end, tenant_id=tenant))
            minutes = await session.scalar(
                select(func.sum(UsageMinute.requests)).where(UsageMinute.tenant_id == tenant)
            )
            hours = await session.scalar(
                select(func.sum(UsageHour.requests)).where(UsageHour.tenant_id == tenant)
            )
        assert read == raw
        assert sum(u.requests for u in raw.values()) == len(write) == minutes
        assert hours == len(write)  # every hour of it has ended

    run(db_url, check)


@pytest.mark.parametrize(
    ("start_offset", "end_offset"),
    [
        (timedelta(0), timedelta(hours=2)),  # whole hours
        (timedelta(minutes=13), timedelta(minutes=97)),  # whole minutes across an hour
        (timedelta(seconds=17.5), timedelta(minutes=61, seconds=3)),  # ragged edges
        (timedelta(minutes=5, seconds=1), timedelta(minutes=5, seconds=40)),  # inside a minute
    ],
)
def test_usage_over_any_window_equals_the_records(
    db_url: str, start_offset: timedelta, end_offset: timedelta
) -> None:
    tenant = "t-windows"
    base = BASE + timedelta(days=1)
    if not run(db_url, lambda db: _has_usage(db, tenant)):
        run(db_url, lambda db: write_usage(db, spread(tenant, base, minutes=150, per_minute=5)))
        roll(db_url)

    async def check(db: Database) -> None:
        start, end = base + start_offset, base + end_offset
        async with db.sessionmaker() as session:
            raw = totals_by_function(await raw_totals(session, start, end, tenant_id=tenant))
            read = totals_by_function(await usage_totals(session, start, end, tenant_id=tenant))
        assert read == raw and raw

    run(db_url, check)


async def _has_usage(db: Database, tenant: str) -> bool:
    async with db.sessionmaker() as session:
        return bool(await usage_totals(session, BASE, NOW, tenant_id=tenant))


def test_usage_reads_the_open_tail_from_the_records(own_db_url: str) -> None:
    db_url, tenant = own_db_url, "t-tail"
    start = floor_to(NOW - timedelta(hours=3), MINUTE)
    rows = spread(tenant, start, minutes=120, per_minute=3)
    run(db_url, lambda db: write_usage(db, rows))

    # Roll up only the first hour of it; the rest stays in the records.
    roll(db_url, now=start + timedelta(minutes=61, seconds=30))

    async def check(db: Database) -> None:
        async with db.sessionmaker() as session:
            raw = totals_by_function(await raw_totals(session, start, NOW, tenant_id=tenant))
            read = totals_by_function(await usage_totals(session, start, NOW, tenant_id=tenant))
            state = (await session.execute(select(RollupState))).scalar_one()
        assert read == raw
        assert state.minutes_to < start + 120 * MINUTE

    run(db_url, check)


def test_running_the_rollup_again_changes_nothing(own_db_url: str) -> None:
    db_url, tenant = own_db_url, "t-again"
    run(db_url, lambda db: write_usage(db, spread(tenant, BASE + timedelta(days=2), 70, 3)))
    roll(db_url)
    first = run(db_url, lambda db: _bucket_rows(db, tenant))

    # Force the job over the same range again, as after a crash just before its commit.
    async def rewind(db: Database) -> None:
        async with db.engine.begin() as conn:
            await conn.execute(
                update(RollupState).values(
                    minutes_to=BASE + timedelta(days=2), hours_to=BASE + timedelta(days=2)
                )
            )

    run(db_url, rewind)
    roll(db_url)

    assert run(db_url, lambda db: _bucket_rows(db, tenant)) == first


async def _bucket_rows(db: Database, tenant: str) -> list[tuple[Any, ...]]:
    rows = []
    async with db.sessionmaker() as session:
        for model in (UsageMinute, UsageHour):
            result = await session.execute(
                select(model.bucket_start, model.function_id, model.requests, model.mb_ms)
                .where(model.tenant_id == tenant)
                .order_by(model.bucket_start, model.function_id)
            )
            rows += [tuple(r) for r in result]
    return rows


def test_a_rollup_that_fails_midway_leaves_nothing_half_done(
    own_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db_url, tenant = own_db_url, "t-crash"
    start = floor_to(NOW - timedelta(minutes=50), MINUTE)
    run(db_url, lambda db: write_usage(db, spread(tenant, start, 20, 2), mark=False))
    before = run(db_url, _state)

    async def fail(*args: object) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(rollups, "_roll_hours", fail)
    monkeypatch.setattr(rollups, "MAX_STEP", timedelta(days=400))
    with pytest.raises(RuntimeError):
        roll(db_url, now=start + timedelta(hours=2))

    assert run(db_url, _state) == before
    monkeypatch.undo()
    roll(db_url)
    assert run(db_url, lambda db: _reconciled(db, tenant))


async def _state(db: Database) -> tuple[Any, ...]:
    async with db.sessionmaker() as session:
        row = (
            await session.execute(select(RollupState.minutes_to, RollupState.hours_to))
        ).one_or_none()
        minutes = await session.scalar(select(func.count()).select_from(UsageMinute))
    return (row, minutes)


async def _reconciled(db: Database, tenant: str) -> bool:
    """Reconcile everything (rollups included), and require the tenant's checks to agree."""
    async with db.sessionmaker() as session:
        checks = []
        for period in (Period.containing(NOW).previous(), Period.containing(NOW)):
            checks += await reconcile_period(session, period, datetime.now(UTC))
    mine = [c for c in checks if c.tenant_id == tenant]
    failed = [c for c in mine if not c.ok]
    assert mine and not failed, failed
    return True


def test_a_record_that_arrives_after_its_minute_was_rolled_up_is_counted(db_url: str) -> None:
    tenant = "t-late"
    minute = BASE + timedelta(days=4)
    run(db_url, lambda db: write_usage(db, [usage_row(tenant, "f", minute, billed_ms=10)]))
    roll(db_url)

    late = usage_row(tenant, "f", minute + timedelta(seconds=30), billed_ms=5)
    run(db_url, lambda db: write_usage(db, [late]))

    async def read(db: Database) -> Usage:
        async with db.sessionmaker() as session:
            totals = await usage_totals(session, minute - HOUR, minute + HOUR, tenant_id=tenant)
        return sum((t.usage for t in totals), Usage())

    # Counted from the moment it commits, before the job has redone its minute and hour...
    assert run(db_url, read).billed_ms == 15
    roll(db_url)
    # ...and the same after.
    assert run(db_url, read).billed_ms == 15

    async def check(db: Database) -> None:
        async with db.sessionmaker() as session:
            [total] = await usage_totals(session, minute, minute + HOUR, tenant_id=tenant)
            [hour] = (
                await session.execute(select(UsageHour).where(UsageHour.tenant_id == tenant))
            ).scalars()
            marks = await session.scalar(select(func.count()).select_from(LateHour))
        assert total.usage.requests == 2 and total.usage.billed_ms == 15
        assert hour.requests == 2
        assert marks == 0

    run(db_url, check)


def test_recording_writes_the_record_and_marks_only_late_ones(db_url: str) -> None:
    settings = Settings(metering_settle_s=120)
    platform = SimpleNamespace(settings=settings, db=None)
    fresh = usage_row("t-mark", "f", datetime.now(UTC), billed_ms=7, init_billed_ms=3)
    stale = usage_row("t-mark", "f", datetime.now(UTC) - timedelta(minutes=5), billed_ms=1)

    async def record(db: Database) -> tuple[list[UsageRecord], int]:
        async with db.engine.begin() as conn:
            for row in (fresh, stale):
                await recorder.record_usage(platform, conn, row)  # type: ignore[arg-type]
        async with db.sessionmaker() as session:
            records = (
                await session.execute(
                    select(UsageRecord)
                    .where(UsageRecord.tenant_id == "t-mark")
                    .order_by(UsageRecord.recorded_at.desc())
                )
            ).scalars()
            marks = await session.scalar(
                select(func.count()).select_from(LateHour).where(LateHour.tenant_id == "t-mark")
            )
        return list(records), marks or 0

    records, marks = run(db_url, record)

    assert [{c: getattr(r, c) for c in fresh} for r in records] == [
        fresh,
        stale,
    ]  # read back exactly as written, whatever the write path
    assert marks == 1
    roll(db_url)


def test_series_put_usage_in_utc_buckets(db_url: str) -> None:
    tenant = "t-series"
    start = BASE + timedelta(days=5)
    rows = spread(tenant, start, minutes=125, per_minute=2)
    run(db_url, lambda db: write_usage(db, rows))
    roll(db_url)

    async def series(db: Database, granularity: str) -> dict[Any, Any]:
        async with db.sessionmaker() as session:
            return await usage_series(
                session,
                start - HOUR,
                start + 3 * HOUR,
                granularity,
                tenant_id=tenant,  # type: ignore[arg-type]
            )

    by_minute = run(db_url, lambda db: series(db, "minute"))
    by_hour = run(db_url, lambda db: series(db, "hour"))
    by_day = run(db_url, lambda db: series(db, "day"))

    alpha = (tenant, "alpha")
    expected_minutes = sorted(
        {floor_to(r["recorded_at"], MINUTE) for r in rows if r["function_name"] == "alpha"}
    )
    assert [at for at, _ in by_minute[alpha]] == expected_minutes
    assert [at for at, _ in by_hour[alpha]] == [start, start + HOUR, start + 2 * HOUR]
    assert [at for at, _ in by_day[alpha]] == [floor_to(start, timedelta(days=1))]
    for series_ in (by_minute, by_hour, by_day):
        assert sum(u.requests for s in series_.values() for _, u in s) == len(rows)
        assert sum(u.mb_ms for s in series_.values() for _, u in s) == sum(r["mb_ms"] for r in rows)


def test_reconciliation_agrees_and_catches_a_tampered_rollup(db_url: str) -> None:
    tenant = "t-tamper"
    start = BASE + timedelta(days=6)
    run(db_url, lambda db: write_usage(db, spread(tenant, start, 30, 2)))
    roll(db_url)
    assert run(db_url, lambda db: _reconciled(db, tenant))

    async def tamper(db: Database) -> list[str]:
        # One millisecond too many in a minute and in its hour, as if the job had miscounted.
        async with db.engine.begin() as conn:
            for model in (UsageMinute, UsageHour):
                await conn.execute(
                    update(model)
                    .where(model.tenant_id == tenant, model.bucket_start == start)
                    .values(billed_ms=model.billed_ms + 1)
                )
        async with db.sessionmaker() as session:
            period = Period.containing(start)
            checks = await reconcile_period(session, period, datetime.now(UTC))
        return sorted({c.what.split(",")[0] for c in checks if not c.ok and c.tenant_id == tenant})

    failed = run(db_url, tamper)
    assert "minute rollups = records" in failed
    assert "usage read = records" in failed
    assert "invoice from rollups = invoice from records" in failed

    # Marking the minute as late repairs it from the records.
    async def repair(db: Database) -> None:
        async with db.engine.begin() as conn:
            marks = [usage_row(tenant, f, start, billed_ms=0) for f in ("alpha", "beta", "gamma")]
            await recorder.mark_late(conn, marks)

    run(db_url, repair)
    roll(db_url)
    assert run(db_url, lambda db: _reconciled(db, tenant))


def test_a_finalised_invoice_is_not_recomputed(db_url: str) -> None:
    tenant = "t-final"
    period = Period.containing(BASE)
    at = BASE + timedelta(days=7)
    run(db_url, lambda db: write_usage(db, [usage_row(tenant, "f", at, billed_ms=1000)]))
    roll(db_url)

    async def finalise_then_add(db: Database) -> tuple[Any, Any, Any]:
        async with db.sessionmaker() as session:
            first = await finalise(session, tenant, period, datetime.now(UTC))
        await write_usage(db, [usage_row(tenant, "f", at, billed_ms=5000)])
        async with db.sessionmaker() as session:
            again = await finalise(session, tenant, period, datetime.now(UTC))
            stored = await stored_invoice(session, tenant, period)
            now_computed = await compute(session, tenant, period, period.end, source="records")
            checks = await reconcile_period(session, period, datetime.now(UTC), tenant_id=tenant)
        return first, again, (stored, now_computed, checks)

    first, again, (stored, recomputed, checks) = run(db_url, finalise_then_add)
    assert first.status == again.status == "final"
    assert again.billed_ms == first.billed_ms == 1000 == stored.billed_ms
    assert recomputed.billed_ms == 6000
    [mismatch] = [c for c in checks if not c.ok and c.what.startswith("finalised")]
    assert "1000 ms" in mismatch.actual
