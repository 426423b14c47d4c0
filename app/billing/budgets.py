"""Monthly budgets: threshold events and the optional hard cap.

A budget is compared with the running total of the tenant's open invoice (the same amount the
invoice shows). The first time in a period that the total reaches 80% and 100% of the budget,
an event is recorded; with a hard cap, reaching 100% makes further invocations fail with 402
``BudgetExceededException`` until the next period starts or the budget is raised.

The invoke path must stay cheap, so it never computes a total: each process keeps the set of
capped tenants in memory (``BudgetGuard``), and a background loop re-evaluates tenants that
have had usage every ``budget_check_interval_s``. A tenant can therefore overshoot its cap by
what it uses within one such interval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from app.billing.invoices import compute
from app.billing.models import Budget, BudgetEvent
from app.billing.money import format_decimal, round_to_minor_unit
from app.billing.periods import Period
from app.billing.service import plan_in_force
from app.db import utcnow
from app.errors import InvalidParameterValue, LambentError, ResourceNotFound
from app.logging import get_logger
from app.tenants.scope import TenantScope

log = get_logger(__name__)

THRESHOLDS = (80, 100)


class BudgetExceeded(LambentError):
    status_code = 402
    type = "BudgetExceededException"


class BudgetNotFound(ResourceNotFound):
    pass


@dataclass(frozen=True)
class BudgetStatus:
    budget: Budget
    currency: str
    period: Period
    spent: Decimal

    @property
    def percent_used(self) -> Decimal:
        return (self.spent * 100 / self.budget.amount).quantize(Decimal("0.01"))

    @property
    def capped(self) -> bool:
        return self.budget.hard_cap and self.spent >= self.budget.amount


async def get_budget(session: AsyncSession, tenant_id: str) -> Budget:
    budget = await session.scalar(TenantScope(tenant_id).select(Budget))
    if budget is None:
        raise BudgetNotFound("no budget is set; set one with PUT /v1/budget")
    return budget


async def set_budget(
    session: AsyncSession, tenant_id: str, amount: Decimal, hard_cap: bool, now: datetime
) -> Budget:
    terms = await plan_in_force(session, tenant_id, now)
    if amount <= 0:
        raise InvalidParameterValue("a budget must be more than zero")
    if round_to_minor_unit(amount, terms.minor_units) != amount:
        raise InvalidParameterValue(
            f"a budget in {terms.currency} has at most {terms.minor_units} decimal places"
        )
    budget = await session.scalar(TenantScope(tenant_id).select(Budget))
    if budget is None:
        budget = Budget(tenant_id=tenant_id, amount=amount, hard_cap=hard_cap, updated_at=now)
        session.add(budget)
    else:
        budget.amount, budget.hard_cap, budget.updated_at = amount, hard_cap, now
    await session.commit()
    log.info("budget set", tenant_id=tenant_id, amount=format_decimal(amount), hard_cap=hard_cap)
    return budget


async def delete_budget(session: AsyncSession, tenant_id: str) -> None:
    await get_budget(session, tenant_id)
    await session.execute(delete(Budget).where(Budget.tenant_id == tenant_id))
    await session.commit()


async def list_events(session: AsyncSession, tenant_id: str) -> list[BudgetEvent]:
    return list(
        (
            await session.execute(
                TenantScope(tenant_id)
                .select(BudgetEvent)
                .order_by(BudgetEvent.occurred_at.desc(), BudgetEvent.threshold_percent.desc())
            )
        ).scalars()
    )


async def evaluate(session: AsyncSession, tenant_id: str, now: datetime) -> BudgetStatus | None:
    """Compare the open invoice with the budget, recording any threshold newly crossed."""
    budget = await session.scalar(TenantScope(tenant_id).select(Budget))
    if budget is None:
        return None
    period = Period.containing(now)
    priced = await compute(session, tenant_id, period, now)
    spent = round_to_minor_unit(priced.total, priced.minor_units)
    status = BudgetStatus(budget, priced.currency, period, spent)

    crossed = [t for t in THRESHOLDS if spent * 100 >= budget.amount * t]
    if crossed:
        dialect = session.bind.dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        rows = [
            {
                "tenant_id": tenant_id,
                "period_start": period.start,
                "threshold_percent": t,
                "budget_amount": budget.amount,
                "spent": spent,
                "currency": priced.currency,
                "hard_cap": budget.hard_cap,
                "occurred_at": utcnow(),
            }
            for t in crossed
        ]
        # Each crossing is recorded once per period and budget, whoever sees it first.
        result = await session.execute(
            insert(BudgetEvent)
            .values(rows)
            .on_conflict_do_nothing()
            .returning(BudgetEvent.threshold_percent)
        )
        new = sorted(result.scalars())
        await session.commit()
        for threshold in new:
            log.warning(
                "budget threshold crossed",
                tenant_id=tenant_id,
                threshold_percent=threshold,
                budget=format_decimal(budget.amount),
                spent=format_decimal(spent),
            )
    return status


@dataclass
class BudgetGuard:
    """This process's view of which tenants are capped; read on every invocation."""

    blocked: dict[str, tuple[float, str]] = field(default_factory=dict)
    budgeted: set[str] = field(default_factory=set)
    active: set[str] = field(default_factory=set)

    def admit(self, tenant_id: str) -> None:
        entry = self.blocked.get(tenant_id)
        if entry is not None and time.time() < entry[0]:
            raise BudgetExceeded(entry[1], tenant_id=tenant_id)

    def note_usage(self, tenant_id: str) -> None:
        if tenant_id in self.budgeted:
            self.active.add(tenant_id)

    def apply(self, tenant_id: str, status: BudgetStatus | None) -> None:
        if status is None:
            self.budgeted.discard(tenant_id)
            self.blocked.pop(tenant_id, None)
            return
        self.budgeted.add(tenant_id)
        if not status.capped:
            self.blocked.pop(tenant_id, None)
            return
        amount = f"{format_decimal(status.budget.amount)} {status.currency}"
        message = (
            f"the monthly budget of {amount} is used up "
            f"({format_decimal(status.spent)} {status.currency} spent this period); invocations "
            f"are refused until {status.period.end.isoformat()} or until the budget is raised"
        )
        self.blocked[tenant_id] = (status.period.end.timestamp(), message)


async def budgeted_tenants(session: AsyncSession) -> set[str]:
    return set((await session.execute(select(Budget.tenant_id))).scalars())
