from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Depends, Query

from app.auth import require_tenant
from app.errors import InvalidParameterValue
from app.metering import service
from app.metering.schemas import FunctionUsage, UsageReport, UsageTotals
from app.platform import Platform, get_platform

router = APIRouter(prefix="/v1/usage", tags=["usage"])


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@router.get("", response_model=UsageReport)
async def get_usage(
    start: datetime | None = Query(None, description="Inclusive; default: start of this month"),
    end: datetime | None = Query(None, description="Exclusive; default: now"),
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> UsageReport:
    """Requests, billed milliseconds and GB-seconds per function and in total (UTC)."""
    now = datetime.now(UTC)
    end_at = _as_utc(end) if end else now
    start_at = (
        _as_utc(start) if start else now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    )
    if start_at > end_at:
        raise InvalidParameterValue("start must not be after end")

    async with platform.db.sessionmaker() as session:
        rows = await service.usage_by_function(session, tenant_id, start_at, end_at)
    functions = [
        FunctionUsage(
            function=row.function,
            requests=row.requests,
            billed_ms=row.billed_ms,
            gb_seconds=float(service.gb_seconds(row.mb_ms)),
        )
        for row in rows
    ]
    total = UsageTotals(
        requests=sum(r.requests for r in rows),
        billed_ms=sum(r.billed_ms for r in rows),
        gb_seconds=float(service.gb_seconds(sum(r.mb_ms for r in rows))),
    )
    return UsageReport(start=start_at, end=end_at, functions=functions, total=total)
