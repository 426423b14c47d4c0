from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class UsageTotals(BaseModel):
    requests: int
    billed_ms: int
    gb_seconds: float = Field(description="billed ms / 1,000 × memory MB / 1,024, summed")


class FunctionUsage(UsageTotals):
    function: str


class UsagePoint(UsageTotals):
    start: datetime = Field(description="The bucket's start; it lasts one granularity step")


class FunctionSeries(BaseModel):
    function: str
    points: list[UsagePoint] = Field(description="Buckets with usage, in time order")


class UsageReport(BaseModel):
    start: datetime
    end: datetime
    functions: list[FunctionUsage]
    total: UsageTotals
    granularity: Literal["minute", "hour", "day"] | None = None
    series: list[FunctionSeries] | None = Field(
        None, description="Per function, when a granularity is asked for"
    )


class TenantUsage(BaseModel):
    tenant_id: str
    functions: list[FunctionUsage]
    total: UsageTotals
    series: list[FunctionSeries] | None = None


class OperatorUsageReport(BaseModel):
    start: datetime
    end: datetime
    granularity: Literal["minute", "hour", "day"] | None = None
    tenants: list[TenantUsage]
    total: UsageTotals
