"""Metering and billing's part of a running control plane: one background loop and the
per-process budget guard.

The loop rolls usage up every ``rollup_interval_s``, re-evaluates budgets of tenants with new
usage every ``budget_check_interval_s`` (all budgets every minute, which also catches time-based
charges such as provisioned concurrency), and finalises due invoices every
``billing_sweep_interval_s``. Every step is a set of short transactions, so a process killed
mid-step leaves nothing half-done, and the next start simply does the step again.

The state lives beside the ``Platform`` (keyed by it) rather than on it, so that billing can
grow without widening the object every domain shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime

from app.billing import budgets
from app.billing.budgets import BudgetGuard
from app.billing.invoices import finalise_due
from app.billing.service import ensure_default_plan
from app.db import Database
from app.logging import get_logger
from app.metering.rollups import roll_up
from app.platform import Platform
from app.settings import Settings

log = get_logger(__name__)

FULL_BUDGET_SWEEP_S = 60.0
TICK_S = 0.25


class BillingRuntime:
    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.guard = BudgetGuard()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async with self.db.sessionmaker() as session:
            await ensure_default_plan(session)
        await self.check_budgets(everyone=True)
        self._task = asyncio.create_task(self._run_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def roll_up(self) -> None:
        await roll_up(self.db.engine, settle_s=self.settings.metering_settle_s)

    async def check_budgets(self, *, everyone: bool = False) -> None:
        async with self.db.sessionmaker() as session:
            self.guard.budgeted = await budgets.budgeted_tenants(session)
            for tenant_id in list(self.guard.blocked):
                if tenant_id not in self.guard.budgeted:
                    del self.guard.blocked[tenant_id]
            due = set(self.guard.budgeted) if everyone else self.guard.active & self.guard.budgeted
            self.guard.active -= due
            now = datetime.now(UTC)
            for tenant_id in sorted(due):
                self.guard.apply(tenant_id, await budgets.evaluate(session, tenant_id, now))

    async def check_budget(self, tenant_id: str) -> budgets.BudgetStatus | None:
        """Evaluate one tenant now (after its budget changed) and apply the result."""
        async with self.db.sessionmaker() as session:
            status = await budgets.evaluate(session, tenant_id, datetime.now(UTC))
        self.guard.apply(tenant_id, status)
        return status

    async def finalise_due(self) -> None:
        async with self.db.sessionmaker() as session:
            await finalise_due(session, datetime.now(UTC), self.settings.metering_settle_s)

    async def _run_forever(self) -> None:
        s = self.settings
        jobs = [
            (self.roll_up, s.rollup_interval_s),
            (self.check_budgets, s.budget_check_interval_s),
            (lambda: self.check_budgets(everyone=True), FULL_BUDGET_SWEEP_S),
            (self.finalise_due, s.billing_sweep_interval_s),
        ]
        due = [time.monotonic()] * len(jobs)
        while True:
            for i, (job, interval) in enumerate(jobs):
                if time.monotonic() < due[i]:
                    continue
                try:
                    await job()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the next round retries; nothing is half-written
                    log.exception(
                        "billing job failed", job=getattr(job, "__name__", "?"), exc_info=exc
                    )
                due[i] = time.monotonic() + interval
            await asyncio.sleep(TICK_S)


_RUNTIMES: dict[int, BillingRuntime] = {}


def billing(platform: Platform) -> BillingRuntime:
    runtime = _RUNTIMES.get(id(platform))
    if runtime is None:
        runtime = _RUNTIMES[id(platform)] = BillingRuntime(platform.settings, platform.db)
    return runtime


async def start_billing(platform: Platform) -> None:
    await billing(platform).start()


async def stop_billing(platform: Platform) -> None:
    runtime = _RUNTIMES.pop(id(platform), None)
    if runtime is not None:
        await runtime.stop()
