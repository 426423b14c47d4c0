"""Provisioned concurrency: 5-minute blocks, its own invoice lines, and the lower duration price."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from app.billing.invoices import compute
from app.billing.periods import Period
from app.billing.pricing import LineKind, gb_seconds
from app.billing.provisioned import BLOCK_MS, Change, provisioned_blocks, record_provisioned_change
from app.billing.service import DEFAULT_TERMS, ensure_default_plan
from app.db import Database
from app.metering.reconcile import reconcile_period
from app.metering.rollups import roll_up
from tests.billing_support import fresh_database, usage_row, with_db, write_usage

PERIOD = Period.parse("2026-11")
T0 = datetime(2026, 11, 10, 10, 0, tzinfo=UTC)


def change(minute: float, count: int, memory_mb: int = 1024, function: str = "f") -> Change:
    return Change(function, function, memory_mb, count, T0 + timedelta(minutes=minute))


def blocks(*changes: Change, end: datetime = PERIOD.end) -> dict[datetime, int]:
    result = provisioned_blocks(list(changes), PERIOD.start, end)
    return result["f"].blocks if "f" in result else {}


def at(minute: int) -> datetime:
    return T0 + timedelta(minutes=minute)


def test_time_provisioned_is_rounded_up_to_whole_five_minute_blocks() -> None:
    assert blocks(change(2, 1), change(8, 0)) == {at(0): 1024, at(5): 1024}


def test_a_block_is_charged_at_its_largest_count() -> None:
    assert blocks(change(1, 1), change(3, 4), change(4, 2), change(12, 0)) == {
        at(0): 4096,
        at(5): 2048,
        at(10): 2048,
    }


def test_count_and_memory_both_weigh() -> None:
    assert blocks(change(0, 3, memory_mb=512), change(5, 0)) == {at(0): 1536}


def test_turned_off_means_nothing_is_charged() -> None:
    assert blocks(change(0, 0)) == {}


def test_provisioning_from_an_earlier_period_is_charged_from_this_periods_start() -> None:
    before = Change("f", "f", 1024, 2, PERIOD.start - timedelta(days=3))
    off = Change("f", "f", 1024, 0, PERIOD.start + timedelta(minutes=7))

    assert blocks(before, off) == {
        PERIOD.start: 2048,
        PERIOD.start + timedelta(minutes=5): 2048,
    }


def test_provisioning_still_on_is_charged_up_to_the_end_given() -> None:
    charged = blocks(change(0, 1), end=at(11))

    assert sorted(charged) == [at(0), at(5), at(10)]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with fresh_database(request.param, tmp_path) as url:
        yield url


def test_provisioned_concurrency_is_billed_on_its_own_lines(db_url: str) -> None:
    tenant = "t-provisioned"
    # On-demand before, provisioned (2 × 512 MB) from 10:00 to 10:20, on-demand after.
    usage = [
        usage_row(tenant, "api", at(-30), billed_ms=1000, memory_mb=512),
        usage_row(tenant, "api", at(3), billed_ms=2000, memory_mb=512),
        usage_row(tenant, "api", at(17), billed_ms=4000, memory_mb=512),
        usage_row(tenant, "api", at(45), billed_ms=8000, memory_mb=512),
        usage_row(tenant, "other", at(5), billed_ms=16000, memory_mb=512),
    ]

    async def scenario(db: Database) -> tuple[object, list[object]]:
        async with db.sessionmaker() as session:
            await ensure_default_plan(session)
            for minute, count in ((0, 2), (20, 0)):
                await record_provisioned_change(
                    session,
                    tenant_id=tenant,
                    function_id="fn-api",
                    function_name="api",
                    memory_mb=512,
                    count=count,
                    at=at(minute),
                )
            await session.commit()
        await write_usage(db, usage)
        await roll_up(db.engine, settle_s=0)
        async with db.sessionmaker() as session:
            priced = await compute(session, tenant, PERIOD, PERIOD.end)
            checks = await reconcile_period(session, PERIOD, datetime.now(UTC), tenant_id=tenant)
        return priced, checks

    priced, checks = with_db(db_url, scenario)

    lines = {(line.function_name, line.kind): line for line in priced.lines}  # type: ignore[attr-defined]
    concurrency = lines[("api", LineKind.PROVISIONED_CONCURRENCY)]
    duration = lines[("api", LineKind.PROVISIONED_DURATION)]
    invocations = lines[("api", LineKind.INVOCATIONS)]
    # 20 minutes = 4 blocks of 2 × 512 MB.
    assert concurrency.gb_seconds == gb_seconds(4 * BLOCK_MS * 1024) == 1200
    assert concurrency.exact_amount == 1200 * DEFAULT_TERMS.provisioned_gb_second_price
    assert duration.billed_ms == 6000
    assert duration.exact_amount == 3 * DEFAULT_TERMS.provisioned_duration_gb_second_price
    assert invocations.requests == 4 and invocations.billed_ms == 9000
    # Only the function with provisioned concurrency gets the lower price.
    assert lines[("other", LineKind.INVOCATIONS)].billed_ms == 16000
    assert ("other", LineKind.PROVISIONED_DURATION) not in lines
    assert concurrency.amount == Decimal("0.01")  # 0.00500004 rounds half-up to a cent
    failed = [c for c in checks if not c.ok]  # type: ignore[attr-defined]
    assert not failed, failed
