from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Query, Request, Response

from app.auth import require_tenant
from app.errors import InvalidRequestContent, LambentError, PayloadTooLarge, ResourceNotFound
from app.functions import service as functions
from app.http import read_limited
from app.invocations import service
from app.invocations.models import Invocation
from app.invocations.schemas import FunctionError, InvocationList, InvocationOut, InvocationSummary
from app.invocations.writer import records_settled
from app.platform import Platform, get_platform
from app.tenants.schemas import ResourceName
from app.tenants.scope import TenantScope

router = APIRouter(tags=["invocations"])


class ResponseTooLarge(PayloadTooLarge):
    type = "ResponseTooLargeException"


class WorkerLost(LambentError):
    status_code = 502
    type = "WorkerLostException"


def _summary_fields(row: Invocation) -> dict[str, object]:
    return {
        "request_id": row.request_id,
        "function": row.function_name,
        "status": row.status,
        "error_type": row.error_type,
        "cold_start": row.cold_start,
        "start_kind": row.start_kind,
        "duration_ms": round(row.duration_ns / 1_000_000, 3),
        "billed_duration_ms": row.billed_ms,
        "init_duration_ms": (
            None if row.init_duration_ns is None else round(row.init_duration_ns / 1_000_000, 3)
        ),
        "memory_mb": row.memory_mb,
        "max_memory_used_mb": row.max_memory_used_mb,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
    }


@router.post(
    "/v1/functions/{name}/invocations",
    response_class=Response,
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"description": "The event: any JSON"}}},
        }
    },
    responses={
        200: {
            "description": "The handler's return value as JSON; when X-Function-Error is set, "
            "the error instead",
            "content": {"application/json": {"schema": FunctionError.model_json_schema()}},
            "headers": {
                "X-Request-Id": {"schema": {"type": "string"}},
                "X-Function-Error": {"schema": {"type": "string"}},
            },
        },
        413: {"description": "The event or the response is over 6 MB"},
    },
)
async def invoke_function(
    name: ResourceName,
    request: Request,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> Response:
    """Invoke a function synchronously with the body as its event."""
    limit = platform.settings.max_payload_bytes
    payload = await read_limited(request, limit, event_too_large(limit))
    status, headers, body = await invoke_reply(platform, tenant_id, name, payload)
    return Response(content=body, status_code=status, headers=headers, media_type=JSON)


JSON = "application/json"


def event_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the event is larger than {limit} bytes, the limit for an invocation")


async def invoke_reply(
    platform: Platform, tenant_id: str, name: str, payload: bytes
) -> tuple[int, dict[str, str], bytes]:
    """Invoke the tenant's function; the status, headers and body to answer with.

    Shared by the route above and by the ASGI fast path (app.invocations.fastpath), which
    serves the same requests without FastAPI's routing and dependency resolution.
    """
    cached = await functions.get_cached(platform, tenant_id, name)
    try:
        event = service.parse_event(payload)
    except ValueError:
        raise InvalidRequestContent("the request body is not valid JSON") from None

    outcome = await service.invoke(platform, cached, event)
    headers = {"X-Request-Id": outcome.request_id}
    error: LambentError | None = None
    if outcome.worker_lost:
        error = WorkerLost(
            "the worker running this invocation stopped answering; the function may or may not "
            "have run"
        )
    elif outcome.response_too_large:
        limit = platform.settings.max_payload_bytes
        error = ResponseTooLarge(
            f"the function's response is larger than {limit} bytes, the limit for an invocation"
        )
    if error is not None:
        return error.status_code, headers, json.dumps(error.body()).encode()
    if outcome.error_type is not None:
        headers["X-Function-Error"] = "Unhandled"
    return 200, headers, outcome.body


@router.get(
    "/v1/invocations/{request_id}",
    response_model=InvocationOut,
    dependencies=[Depends(records_settled)],
)
async def get_invocation(
    request_id: str,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> InvocationOut:
    """One invocation's outcome, usage and logs."""
    async with platform.db.sessionmaker() as session:
        row = await session.scalar(
            TenantScope(tenant_id).select(Invocation).where(Invocation.request_id == request_id)
        )
    if row is None:
        raise ResourceNotFound(f"invocation {request_id!r} does not exist")
    return InvocationOut(**_summary_fields(row), logs=row.logs)


@router.get(
    "/v1/functions/{name}/invocations",
    response_model=InvocationList,
    dependencies=[Depends(records_settled)],
)
async def list_invocations(
    name: ResourceName,
    limit: int = Query(50, ge=1, le=1000),
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> InvocationList:
    """The function's most recent invocations, newest first."""
    fn = await functions.get_function(platform, tenant_id, name)
    async with platform.db.sessionmaker() as session:
        rows = (
            await session.execute(
                TenantScope(tenant_id)
                .select(Invocation)
                .where(Invocation.function_id == fn.id)
                .order_by(Invocation.started_at.desc())
                .limit(limit)
            )
        ).scalars()
    return InvocationList(invocations=[InvocationSummary(**_summary_fields(r)) for r in rows])
