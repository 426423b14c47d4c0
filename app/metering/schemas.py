from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class UsageTotals(BaseModel):
    requests: int
    billed_ms: int
    gb_seconds: float = Field(description="billed ms / 1,000 × memory MB / 1,024, summed")


class FunctionUsage(UsageTotals):
    function: str


class UsageReport(BaseModel):
    start: datetime
    end: datetime
    functions: list[FunctionUsage]
    total: UsageTotals
