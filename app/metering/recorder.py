"""Where the invoke path meets metering: admission before an invocation, usage after it.

The invoke path calls only these two functions, so metering and billing can grow (budgets,
counters) without touching it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from app.metering.models import UsageRecord
from app.platform import Platform


async def admit(platform: Platform, tenant_id: str) -> None:
    """Raise if the tenant may not start another invocation now."""
    return None


async def record_usage(
    platform: Platform, connection: AsyncConnection, usage_row: dict[str, Any]
) -> None:
    """Write an invocation's usage record inside the transaction of its final status."""
    await connection.execute(insert(UsageRecord), [usage_row])
