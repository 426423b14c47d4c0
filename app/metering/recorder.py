"""Where the invoke path meets metering: admission before an invocation, usage after it.

The invoke path calls only these two functions, so metering and billing can grow (budgets,
counters) without touching it. Both run on every invocation: neither reads the database.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from app.billing.periods import HOUR, floor_to
from app.billing.runtime import billing
from app.metering.models import LateHour, UsageRecord
from app.platform import Platform


async def admit(platform: Platform, tenant_id: str) -> None:
    """Raise ``BudgetExceeded`` if the tenant's hard budget cap is reached."""
    billing(platform).guard.admit(tenant_id)


async def record_usage(
    platform: Platform, connection: AsyncConnection, usage_row: dict[str, Any]
) -> None:
    """Write an invocation's usage record inside the transaction of its final status."""
    await record_usage_many(platform, connection, [usage_row])


async def record_usage_many(
    platform: Platform, connection: AsyncConnection, usage_rows: list[dict[str, Any]]
) -> None:
    """Write usage records inside the transaction of their invocations' final status."""
    if not platform.settings.metering_enabled or not usage_rows:
        return
    await connection.execute(insert(UsageRecord), usage_rows)
    late = late_records(platform, usage_rows)
    if late:
        await mark_late(connection, late)
    note_usage(platform, usage_rows)


def late_records(platform: Platform, usage_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records whose hours the transaction writing them must also mark late.

    A record this far behind its own time may land in a minute the rollup job has already done
    (it waits metering_settle_s); its hour is marked so that the job does it again. Half the
    settle time leaves the other half for the transaction to commit.
    """
    late_after = datetime.now(UTC) - timedelta(seconds=platform.settings.metering_settle_s / 2)
    return [row for row in usage_rows if row["recorded_at"] < late_after]


def late_hour_rows(usage_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``usage_late_hours`` rows that mark the hours of these records."""
    keys = {
        (r["tenant_id"], r["function_id"], floor_to(r["recorded_at"], HOUR)) for r in usage_rows
    }
    return [
        {"tenant_id": t, "function_id": f, "hour": h, "until": h + HOUR} for t, f, h in sorted(keys)
    ]


def note_usage(platform: Platform, usage_rows: list[dict[str, Any]]) -> None:
    """Tell the budget guard about usage being written."""
    guard = billing(platform).guard
    for row in usage_rows:
        guard.note_usage(row["tenant_id"])


async def mark_late(connection: AsyncConnection, usage_rows: list[dict[str, Any]]) -> None:
    """Have the rollup job redo the hours of these records (and reads skip their rollups)."""
    dialect = connection.dialect.name
    insert_ = postgresql.insert if dialect == "postgresql" else sqlite.insert
    await connection.execute(
        insert_(LateHour).values(late_hour_rows(usage_rows)).on_conflict_do_nothing()
    )
