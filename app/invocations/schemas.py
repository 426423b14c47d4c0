from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class InvocationSummary(BaseModel):
    request_id: str
    function: str
    status: str = Field(description="success, error or timeout")
    error_type: str | None
    cold_start: bool
    start_kind: str | None = Field(
        description="For a cold start: 'prestarted' when a pre-started sandbox took the function "
        "on (init only loaded its code), 'fresh' when a new sandbox started; null when warm"
    )
    duration_ms: float
    billed_duration_ms: int
    init_duration_ms: float | None
    memory_mb: int
    max_memory_used_mb: int
    started_at: datetime
    finished_at: datetime


class InvocationOut(InvocationSummary):
    logs: str


class InvocationList(BaseModel):
    invocations: list[InvocationSummary]


class FunctionError(BaseModel):
    """The body of a failed invocation (status 200, header X-Function-Error: Unhandled)."""

    errorMessage: str  # noqa: N815 - Lambda's field names
    errorType: str  # noqa: N815
    stackTrace: list[str] = []  # noqa: N815
