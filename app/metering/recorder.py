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
    settings = platform.settings
    if not settings.metering_enabled or not usage_rows:
        return
    if len(usage_rows) == 1:
        await _insert_record(connection, usage_rows[0])
    else:
        await connection.execute(insert(UsageRecord), usage_rows)

    # A record this far behind its own time may land in a minute the rollup job has already
    # done (it waits metering_settle_s); mark its hour so the job does it again. Half the
    # settle time leaves the other half for this transaction to commit.
    late_after = datetime.now(UTC) - timedelta(seconds=settings.metering_settle_s / 2)
    late = [row for row in usage_rows if row["recorded_at"] < late_after]
    if late:
        await mark_late(connection, late)
    guard = billing(platform).guard
    for row in usage_rows:
        guard.note_usage(row["tenant_id"])


# SQLAlchemy's aiosqlite adapter makes three trips to the driver's thread per statement (open a
# cursor, execute, close it); on a busy host each trip costs about as much as the insert itself.
# The driver's own execute makes one, in the same transaction. The timestamp is written in the
# text form SQLAlchemy uses for SQLite, which the rollups and every query rely on.
SQLITE_INSERT = (
    "INSERT INTO usage_records (request_id, tenant_id, function_id, function_name, recorded_at, "
    "requests, memory_mb, billed_ms, init_billed_ms, mb_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"


async def _insert_record(connection: AsyncConnection, row: dict[str, Any]) -> None:
    if connection.dialect.name != "sqlite":
        await connection.execute(insert(UsageRecord), [row])
        return
    raw = await connection.get_raw_connection()
    await raw.driver_connection.execute(  # type: ignore[union-attr]
        SQLITE_INSERT,
        (
            row["request_id"],
            row["tenant_id"],
            row["function_id"],
            row["function_name"],
            row["recorded_at"].astimezone(UTC).strftime(SQLITE_TIME),
            row["requests"],
            row["memory_mb"],
            row["billed_ms"],
            row["init_billed_ms"],
            row["mb_ms"],
        ),
    )


async def mark_late(connection: AsyncConnection, usage_rows: list[dict[str, Any]]) -> None:
    """Have the rollup job redo the hours of these records (and reads skip their rollups)."""
    keys = {
        (r["tenant_id"], r["function_id"], floor_to(r["recorded_at"], HOUR)) for r in usage_rows
    }
    dialect = connection.dialect.name
    insert_ = postgresql.insert if dialect == "postgresql" else sqlite.insert
    await connection.execute(
        insert_(LateHour)
        .values(
            [
                {"tenant_id": t, "function_id": f, "hour": h, "until": h + HOUR}
                for t, f, h in sorted(keys)
            ]
        )
        .on_conflict_do_nothing()
    )
