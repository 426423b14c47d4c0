from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.auth import Principal, require_operator
from app.platform import Platform, get_platform

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(
    _: Principal = Depends(require_operator), platform: Platform = Depends(get_platform)
) -> Response:
    """Prometheus metrics: invocations, errors, throttles, cold starts, waits, instances."""
    return Response(platform.metrics.render(), media_type=CONTENT_TYPE_LATEST)
