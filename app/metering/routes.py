from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

from fastapi import APIRouter, Depends, Query

from app.auth import Principal, require_operator, require_tenant
from app.billing.pricing import Usage
from app.errors import InvalidParameterValue
from app.invocations.writer import records_settled
from app.metering import service
from app.metering.schemas import (
    FunctionSeries,
    FunctionUsage,
    OperatorUsageReport,
    TenantUsage,
    UsagePoint,
    UsageReport,
    UsageTotals,
)
from app.metering.service import GRANULARITY_STEP, Granularity
from app.platform import Platform, get_platform

router = APIRouter(tags=["usage"])
MAX_POINTS = 10_000
GRANULARITY = Query(
    None, description="minute, hour or day: adds a time series per function (UTC buckets)"
)


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _window(
    start: datetime | None, end: datetime | None, granularity: Granularity | None
) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    end_at = _as_utc(end) if end else now
    start_at = (
        _as_utc(start) if start else now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    )
    if start_at > end_at:
        raise InvalidParameterValue("start must not be after end")
    if granularity and (end_at - start_at) / GRANULARITY_STEP[granularity] > MAX_POINTS:
        raise InvalidParameterValue(
            f"a {granularity} series covers at most {MAX_POINTS} buckets; "
            "narrow the window or pick a coarser granularity"
        )
    return start_at, end_at


def _totals(usage: Usage) -> dict[str, object]:
    return {
        "requests": usage.requests,
        "billed_ms": usage.billed_ms,
        "gb_seconds": float(service.gb_seconds(usage.mb_ms)),
    }


def _functions(totals: list[service.FunctionTotal]) -> tuple[list[FunctionUsage], UsageTotals]:
    by_name: dict[str, Usage] = defaultdict(Usage)
    for total in totals:
        by_name[total.function_name] += total.usage
    functions = [FunctionUsage(function=n, **_totals(u)) for n, u in sorted(by_name.items())]
    overall = sum(by_name.values(), Usage())
    return functions, UsageTotals(**_totals(overall))


def _series(points: dict[str, list[tuple[datetime, Usage]]]) -> list[FunctionSeries]:
    return [
        FunctionSeries(
            function=name,
            points=[UsagePoint(start=at, **_totals(usage)) for at, usage in points[name]],
        )
        for name in sorted(points)
    ]


@router.get("/v1/usage", response_model=UsageReport, dependencies=[Depends(records_settled)])
async def get_usage(
    start: datetime | None = Query(None, description="Inclusive; default: start of this month"),
    end: datetime | None = Query(None, description="Exclusive; default: now"),
    granularity: Granularity | None = GRANULARITY,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> UsageReport:
    """Requests, billed milliseconds and GB-seconds per function and in total (UTC)."""
    start_at, end_at = _window(start, end, granularity)
    async with platform.db.sessionmaker() as session:
        totals = await service.usage_totals(session, start_at, end_at, tenant_id=tenant_id)
        series = None
        if granularity:
            points = await service.usage_series(
                session, start_at, end_at, granularity, tenant_id=tenant_id
            )
            series = _series({name: p for (_, name), p in points.items()})
    functions, total = _functions(totals)
    return UsageReport(
        start=start_at,
        end=end_at,
        functions=functions,
        total=total,
        granularity=granularity,
        series=series,
    )


@router.get(
    "/v1/operator/usage",
    response_model=OperatorUsageReport,
    dependencies=[Depends(records_settled)],
)
async def get_all_usage(
    start: datetime | None = Query(None, description="Inclusive; default: start of this month"),
    end: datetime | None = Query(None, description="Exclusive; default: now"),
    granularity: Granularity | None = GRANULARITY,
    tenant_id: str | None = Query(None, description="Only this tenant"),
    _: Principal = Depends(require_operator),
    platform: Platform = Depends(get_platform),
) -> OperatorUsageReport:
    """Usage of every tenant, per function and in total, with optional series."""
    start_at, end_at = _window(start, end, granularity)
    async with platform.db.sessionmaker() as session:
        totals = await service.usage_totals(session, start_at, end_at, tenant_id=tenant_id)
        points: dict[tuple[str, str], list[tuple[datetime, Usage]]] = {}
        if granularity:
            points = await service.usage_series(
                session, start_at, end_at, granularity, tenant_id=tenant_id
            )
    by_tenant: dict[str, list[service.FunctionTotal]] = defaultdict(list)
    for total in totals:
        by_tenant[total.tenant_id].append(total)
    tenants = []
    for tenant in sorted(by_tenant):
        functions, tenant_total = _functions(by_tenant[tenant])
        series = None
        if granularity:
            series = _series({name: p for (t, name), p in points.items() if t == tenant})
        tenants.append(
            TenantUsage(tenant_id=tenant, functions=functions, total=tenant_total, series=series)
        )
    _, overall = _functions(totals)
    return OperatorUsageReport(
        start=start_at, end=end_at, granularity=granularity, tenants=tenants, total=overall
    )
