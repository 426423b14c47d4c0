"""Price plans, their versions, and which plan each tenant is on when.

A plan's prices are versions, each in force from a whole minute on; a tenant is on a plan from
an assignment's whole minute on, and on the ``default`` plan before its first assignment. No
change may take effect before the start of the current billing period: periods that have ended
are priced by what was in force then, and their invoices, once finalised, are never computed
again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.billing.models import PlanAssignment, PricePlan, PricePlanVersion, tiers_json
from app.billing.money import minor_units_of
from app.billing.periods import EPOCH, MINUTE, Period, ceil_to
from app.billing.pricing import PlanTerms, Tier
from app.errors import InvalidParameterValue, ResourceConflict, ResourceNotFound
from app.logging import get_logger
from app.tenants.models import Tenant

log = get_logger(__name__)

DEFAULT_PLAN = "default"
# AWS Lambda's x86 list prices: requests, duration in three monthly tiers, the monthly free
# allowance, provisioned concurrency and the duration price while provisioned. Lambda bills the
# init phase of cold starts since August 2025, so the default plan does too.
DEFAULT_TERMS = PlanTerms(
    plan=DEFAULT_PLAN,
    currency="USD",
    minor_units=2,
    request_price_per_million=Decimal("0.20"),
    gb_second_price=Decimal("0.0000166667"),
    tiers=(
        Tier(Decimal(6_000_000_000), Decimal("0.000015")),
        Tier(Decimal(15_000_000_000), Decimal("0.000013334")),
    ),
    free_requests=1_000_000,
    free_gb_seconds=Decimal(400_000),
    provisioned_gb_second_price=Decimal("0.0000041667"),
    provisioned_duration_gb_second_price=Decimal("0.0000097222"),
    bill_init=True,
)
PRICE_FIELDS = (
    "request_price_per_million",
    "gb_second_price",
    "tiers",
    "free_requests",
    "free_gb_seconds",
    "provisioned_gb_second_price",
    "provisioned_duration_gb_second_price",
    "bill_init",
)


class PlanNotFound(ResourceNotFound):
    pass


class PlanConflict(ResourceConflict):
    pass


class ClosedPeriod(ResourceConflict):
    """A change would reach into a billing period that has ended."""


class UnknownTenant(ResourceNotFound):
    pass


@dataclass(frozen=True)
class PlanHistory:
    plan: PricePlan
    versions: list[PricePlanVersion]  # oldest first

    def version_at(self, at: datetime) -> PricePlanVersion:
        current = self.versions[0]
        for version in self.versions:
            if version.effective_from <= at:
                current = version
        return current

    def terms_at(self, at: datetime) -> PlanTerms:
        return terms_of(self.plan, self.version_at(at))


def terms_of(plan: PricePlan, version: PricePlanVersion) -> PlanTerms:
    return PlanTerms(
        plan=plan.name,
        currency=plan.currency,
        minor_units=plan.minor_units,
        request_price_per_million=version.request_price_per_million,
        gb_second_price=version.gb_second_price,
        tiers=tuple(
            Tier(Decimal(t["above_gb_seconds"]), Decimal(t["gb_second_price"]))
            for t in version.tiers
        ),
        free_requests=version.free_requests,
        free_gb_seconds=version.free_gb_seconds,
        provisioned_gb_second_price=version.provisioned_gb_second_price,
        provisioned_duration_gb_second_price=version.provisioned_duration_gb_second_price,
        bill_init=version.bill_init,
    )


def version_row(plan: str, effective_from: datetime, terms: PlanTerms) -> PricePlanVersion:
    return PricePlanVersion(
        plan=plan,
        effective_from=effective_from,
        request_price_per_million=terms.request_price_per_million,
        gb_second_price=terms.gb_second_price,
        tiers=tiers_json(list(terms.tiers)),
        free_requests=terms.free_requests,
        free_gb_seconds=terms.free_gb_seconds,
        provisioned_gb_second_price=terms.provisioned_gb_second_price,
        provisioned_duration_gb_second_price=terms.provisioned_duration_gb_second_price,
        bill_init=terms.bill_init,
    )


async def ensure_default_plan(session: AsyncSession) -> None:
    """Create the default plan on first start; an operator may change its prices later."""
    if await session.get(PricePlan, DEFAULT_PLAN) is not None:
        return
    session.add(
        PricePlan(
            name=DEFAULT_PLAN,
            currency=DEFAULT_TERMS.currency,
            minor_units=DEFAULT_TERMS.minor_units,
        )
    )
    session.add(version_row(DEFAULT_PLAN, EPOCH, DEFAULT_TERMS))
    try:
        await session.commit()
    except IntegrityError:  # another process made it first
        await session.rollback()


def check_effective_from(at: datetime, now: datetime) -> datetime:
    """A change's start: a whole UTC minute, not before the current billing period."""
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    if at.second or at.microsecond:
        raise InvalidParameterValue(
            f"effective_from must be a whole minute, like {ceil_to(at, MINUTE).isoformat()}"
        )
    current = Period.containing(now)
    if at < current.start:
        raise ClosedPeriod(
            f"effective_from {at.isoformat()} falls in a billing period that has ended; "
            f"changes may take effect from {current.start.isoformat()} on"
        )
    return at


def default_effective_from(now: datetime) -> datetime:
    """The next whole minute: changes apply from now on unless a time is given."""
    return ceil_to(now, MINUTE)


async def load_plan(session: AsyncSession, name: str) -> PlanHistory:
    plan = await session.get(PricePlan, name)
    if plan is None:
        raise PlanNotFound(f"price plan {name!r} does not exist", plan=name)
    versions = list(
        (
            await session.execute(
                select(PricePlanVersion)
                .where(PricePlanVersion.plan == name)
                .order_by(PricePlanVersion.effective_from)
            )
        ).scalars()
    )
    return PlanHistory(plan, versions)


async def list_plans(session: AsyncSession) -> list[PlanHistory]:
    plans = list((await session.execute(select(PricePlan).order_by(PricePlan.name))).scalars())
    versions = list(
        (
            await session.execute(
                select(PricePlanVersion).order_by(PricePlanVersion.effective_from)
            )
        ).scalars()
    )
    return [PlanHistory(p, [v for v in versions if v.plan == p.name]) for p in plans]


async def create_plan(
    session: AsyncSession,
    *,
    name: str,
    currency: str,
    minor_units: int | None,
    terms: dict[str, Any],
) -> PlanHistory:
    units = minor_units if minor_units is not None else minor_units_of(currency)
    if units is None:
        raise InvalidParameterValue(
            f"Lambent does not know the minor units of {currency}; give minor_units (e.g. 2)"
        )
    plan_terms = PlanTerms(plan=name, currency=currency, minor_units=units, **terms)
    plan = PricePlan(name=name, currency=currency, minor_units=units)
    session.add(plan)
    try:
        await session.flush()
    except IntegrityError:
        await session.rollback()
        raise PlanConflict(f"a price plan named {name!r} already exists", plan=name) from None
    # The first version has always been in force: when the plan applies is the assignments' call.
    session.add(version_row(name, EPOCH, plan_terms))
    await session.commit()
    log.info("price plan created", plan=name, currency=currency)
    return await load_plan(session, name)


async def change_plan(
    session: AsyncSession,
    name: str,
    changes: dict[str, Any],
    *,
    effective_from: datetime | None,
    now: datetime,
) -> PlanHistory:
    """A new version of the plan's prices, from ``effective_from`` on."""
    history = await load_plan(session, name)
    at = check_effective_from(effective_from or default_effective_from(now), now)
    if any(v.effective_from == at for v in history.versions):
        raise PlanConflict(
            f"plan {name!r} already has prices from {at.isoformat()}; pick another time", plan=name
        )
    base = history.terms_at(at)
    fields = {f: getattr(base, f) for f in PRICE_FIELDS}
    fields.update(changes)
    terms = PlanTerms(plan=name, currency=base.currency, minor_units=base.minor_units, **fields)
    session.add(version_row(name, at, terms))
    await session.commit()
    log.info("price plan changed", plan=name, effective_from=at.isoformat())
    return await load_plan(session, name)


async def list_assignments(session: AsyncSession, tenant_id: str) -> list[PlanAssignment]:
    return list(
        (
            await session.execute(
                select(PlanAssignment)
                .where(PlanAssignment.tenant_id == tenant_id)
                .order_by(PlanAssignment.effective_from)
            )
        ).scalars()
    )


async def assign_plan(
    session: AsyncSession,
    tenant_id: str,
    plan_name: str,
    *,
    effective_from: datetime | None,
    now: datetime,
) -> PlanAssignment:
    """Put a tenant on a plan from ``effective_from`` on (by default, the next minute)."""
    if await session.get(Tenant, tenant_id) is None:
        raise UnknownTenant(f"no tenant with id {tenant_id!r}", tenant_id=tenant_id)
    history = await load_plan(session, plan_name)
    at = check_effective_from(effective_from or default_effective_from(now), now)
    assignments = await list_assignments(session, tenant_id)
    if any(a.effective_from == at for a in assignments):
        raise PlanConflict(
            f"tenant {tenant_id!r} already changes plan at {at.isoformat()}", tenant_id=tenant_id
        )

    # A period has one currency: a plan in another currency may start only at a period start.
    timeline = sorted([(a.effective_from, a.plan) for a in assignments] + [(at, plan_name)])
    currencies = {p.plan.name: p.plan.currency for p in await list_plans(session)}
    previous = DEFAULT_PLAN
    for start, name in timeline:
        currency, before = currencies[name], currencies.get(previous, DEFAULT_TERMS.currency)
        if currency != before and Period.containing(start).start != start:
            raise PlanConflict(
                f"plan {name!r} is in {currency} but the tenant's plan before "
                f"{start.isoformat()} is in {before}; a change of currency may "
                "take effect only at the start of a billing period",
                tenant_id=tenant_id,
            )
        previous = name

    assignment = PlanAssignment(tenant_id=tenant_id, plan=history.plan.name, effective_from=at)
    session.add(assignment)
    await session.commit()
    log.info("plan assigned", tenant_id=tenant_id, plan=plan_name, effective_from=at.isoformat())
    return assignment


@dataclass(frozen=True)
class PlanSpan:
    """The terms in force over [start, end)."""

    start: datetime
    end: datetime
    terms: PlanTerms
    version_key: tuple[str, int]


async def plan_timeline(session: AsyncSession, tenant_id: str, period: Period) -> list[PlanSpan]:
    """The tenant's plan terms over the period, cut wherever plan or prices change."""
    assignments = await list_assignments(session, tenant_id)
    plans = {p.plan.name: p for p in await list_plans(session)}

    def plan_at(at: datetime) -> str:
        name = DEFAULT_PLAN
        for a in assignments:
            if a.effective_from <= at:
                name = a.plan
        return name

    def terms_at(at: datetime) -> tuple[PlanTerms, tuple[str, int]]:
        name = plan_at(at)
        history = plans.get(name)
        if history is None or not history.versions:  # the default plan before its first start
            return DEFAULT_TERMS, (DEFAULT_PLAN, 0)
        version = history.version_at(at)
        return terms_of(history.plan, version), (name, version.id)

    cuts = {period.start}
    cuts.update(a.effective_from for a in assignments)
    cuts.update(v.effective_from for p in plans.values() for v in p.versions)
    bounds = sorted(c for c in cuts if period.start <= c < period.end) + [period.end]

    spans: list[PlanSpan] = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        terms, key = terms_at(start)
        if spans and spans[-1].version_key == key:
            spans[-1] = PlanSpan(spans[-1].start, end, terms, key)
        else:
            spans.append(PlanSpan(start, end, terms, key))
    return spans


async def plan_in_force(session: AsyncSession, tenant_id: str, at: datetime) -> PlanTerms:
    period = Period.containing(at)
    for span in await plan_timeline(session, tenant_id, period):
        if span.start <= at < span.end:
            return span.terms
    raise AssertionError("a timeline covers its period")
