"""Metering: what each invocation is billed, and usage over a period.

Durations are measured in nanoseconds and billed in whole milliseconds, rounded up: 0.2 ms bills
1 ms, 12.0001 ms bills 13 ms, exactly 12 ms bills 12 ms. Usage is weighted by memory as
GB-seconds = billed ms / 1,000 × memory MB / 1,024, kept exact as integer MB-milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncSession

from app.metering.models import UsageRecord
from app.tenants.scope import TenantScope

NS_PER_MS = 1_000_000
MB_MS_PER_GB_SECOND = 1_024_000  # 1,024 MB × 1,000 ms


def billed_ms(duration_ns: int) -> int:
    """Whole milliseconds billed for a duration: rounded up, never less than what ran."""
    if duration_ns <= 0:
        return 0
    return -(-duration_ns // NS_PER_MS)


def gb_seconds(mb_ms: int) -> Decimal:
    return Decimal(mb_ms) / Decimal(MB_MS_PER_GB_SECOND)


@dataclass(frozen=True)
class UsageRow:
    function: str
    requests: int
    billed_ms: int
    mb_ms: int


async def usage_by_function(
    session: AsyncSession, tenant_id: str, start: datetime, end: datetime
) -> list[UsageRow]:
    query = (
        TenantScope(tenant_id)
        .select(
            UsageRecord,
            UsageRecord.function_name,
            func.sum(UsageRecord.requests),
            func.sum(UsageRecord.billed_ms),
            func.sum(UsageRecord.mb_ms),
        )
        .where(UsageRecord.recorded_at >= start, UsageRecord.recorded_at < end)
        .group_by(UsageRecord.function_name)
        .order_by(UsageRecord.function_name)
    )
    rows = (await session.execute(query)).all()
    return [UsageRow(name, int(req), int(ms), int(mbms)) for name, req, ms, mbms in rows]
