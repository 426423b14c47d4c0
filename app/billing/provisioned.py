"""Provisioned concurrency, as billing sees it: a history of changes, priced in 5-minute blocks.

As Lambda does, provisioned concurrency is charged from when it is turned on until it is turned
off, rounded up to whole 5-minute blocks of the UTC clock: a block in which a function had any
provisioned concurrency is charged in full, at the largest count × memory it had in the block.
The same blocks decide which invocations are "while provisioned" and so charged at the plan's
lower provisioned duration price.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.billing.models import ProvisionedConcurrencyChange
from app.billing.periods import ceil_to, floor_to
from app.logging import get_logger
from app.tenants.scope import TenantScope

log = get_logger(__name__)

BLOCK = timedelta(minutes=5)
BLOCK_MS = 300_000


async def record_provisioned_change(
    session: AsyncSession,
    *,
    tenant_id: str,
    function_id: str,
    function_name: str,
    memory_mb: int,
    count: int,
    at: datetime,
) -> None:
    """Note that a function has ``count`` provisioned instances from ``at`` on (0 = off).

    Runs in the caller's transaction, so the change and the function's new setting are
    committed together.
    """
    if count < 0 or memory_mb <= 0:
        raise ValueError("provisioned concurrency needs count >= 0 and memory_mb > 0")
    await session.execute(
        insert(ProvisionedConcurrencyChange).values(
            tenant_id=tenant_id,
            function_id=function_id,
            function_name=function_name,
            memory_mb=memory_mb,
            count=count,
            at=at,
        )
    )
    log.info(
        "provisioned concurrency noted for billing",
        tenant_id=tenant_id,
        function=function_name,
        count=count,
    )


@dataclass
class ProvisionedFunction:
    function_id: str
    function_name: str
    blocks: dict[datetime, int] = field(default_factory=dict)  # block start → MB provisioned

    def runs(self) -> list[tuple[datetime, datetime]]:
        """Consecutive blocks merged into [start, end) ranges."""
        runs: list[tuple[datetime, datetime]] = []
        for start in sorted(self.blocks):
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], start + BLOCK)
            else:
                runs.append((start, start + BLOCK))
        return runs


@dataclass(frozen=True)
class Change:
    function_id: str
    function_name: str
    memory_mb: int
    count: int
    at: datetime


def provisioned_blocks(
    changes: list[Change], start: datetime, end: datetime
) -> dict[str, ProvisionedFunction]:
    """Each function's charged blocks within [start, end), from its changes in time order."""
    by_function: dict[str, list[Change]] = defaultdict(list)
    for change in changes:
        by_function[change.function_id].append(change)

    result: dict[str, ProvisionedFunction] = {}
    for function_id, history in by_function.items():
        fn = ProvisionedFunction(function_id, history[-1].function_name)
        for i, change in enumerate(history):
            until = history[i + 1].at if i + 1 < len(history) else end
            since, until = max(change.at, start), min(until, end)
            if change.count <= 0 or until <= since:
                continue
            weight = change.count * change.memory_mb
            block = floor_to(since, BLOCK)
            while block < ceil_to(until, BLOCK):
                fn.blocks[block] = max(fn.blocks.get(block, 0), weight)
                block += BLOCK
        if fn.blocks:
            result[function_id] = fn
    return result


async def load_changes(session: AsyncSession, tenant_id: str, before: datetime) -> list[Change]:
    rows = await session.execute(
        TenantScope(tenant_id)
        .select(ProvisionedConcurrencyChange)
        .where(ProvisionedConcurrencyChange.at < before)
        .order_by(ProvisionedConcurrencyChange.at, ProvisionedConcurrencyChange.id)
    )
    return [
        Change(c.function_id, c.function_name, c.memory_mb, c.count, c.at) for c in rows.scalars()
    ]


async def first_change_at(session: AsyncSession, tenant_id: str) -> datetime | None:
    return await session.scalar(
        TenantScope(tenant_id).select(
            ProvisionedConcurrencyChange, func.min(ProvisionedConcurrencyChange.at)
        )
    )
