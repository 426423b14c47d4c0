"""Workers: the operator's view, and the internal routes remote workers call.

The internal routes take the worker token, not an API key, and stay out of the OpenAPI
document: they are the protocol between the control plane and its workers, not the API.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials
from starlette.background import BackgroundTask

from app.auth import Principal, bearer, require_operator
from app.errors import ResourceNotFound, Unauthorized
from app.platform import Platform, get_platform
from app.workers.schemas import WorkerHeartbeat, WorkerId, WorkerList, WorkerRegistration

router = APIRouter(tags=["workers"])
internal = APIRouter(prefix="/v1/internal", include_in_schema=False)


@router.get("/v1/workers", response_model=WorkerList)
async def list_workers(
    _: Principal = Depends(require_operator), platform: Platform = Depends(get_platform)
) -> WorkerList:
    """Every worker with its capacity, use, instances, last heartbeat and status."""
    return WorkerList(workers=platform.workers.listing())


@router.delete("/v1/workers/{worker_id}", status_code=204, response_class=Response)
async def forget_worker(
    worker_id: WorkerId,
    _: Principal = Depends(require_operator),
    platform: Platform = Depends(get_platform),
) -> Response:
    """Forget a dead worker; a live one is refused (stopping it deregisters it)."""
    await platform.workers.forget(worker_id)
    return Response(status_code=204)


async def require_worker(
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    platform: Platform = Depends(get_platform),
) -> None:
    token = platform.settings.worker_token
    if token is None:
        raise Unauthorized(
            "this control plane takes no remote workers: LAMBENT_WORKER_TOKEN is unset"
        )
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise Unauthorized("the worker token is not valid (compare LAMBENT_WORKER_TOKEN)")


@internal.post("/workers", status_code=204, dependencies=[Depends(require_worker)])
async def register_worker(
    registration: WorkerRegistration, platform: Platform = Depends(get_platform)
) -> Response:
    """A worker joins; the control plane checks that it can reach it before using it."""
    await platform.workers.register(registration)
    return Response(status_code=204)


@internal.post(
    "/workers/{worker_id}/heartbeat", status_code=204, dependencies=[Depends(require_worker)]
)
async def heartbeat(
    worker_id: WorkerId, beat: WorkerHeartbeat, platform: Platform = Depends(get_platform)
) -> Response:
    """A worker is alive; 404 tells it to register again."""
    await platform.workers.heartbeat(worker_id, beat)
    return Response(status_code=204)


@internal.delete("/workers/{worker_id}", status_code=204, dependencies=[Depends(require_worker)])
async def deregister_worker(
    worker_id: WorkerId, platform: Platform = Depends(get_platform)
) -> Response:
    """A worker shutting down leaves."""
    await platform.workers.deregister(worker_id)
    return Response(status_code=204)


@internal.get("/packages/{sha256}", dependencies=[Depends(require_worker)])
async def get_package(
    sha256: str = PathParam(pattern=r"^[0-9a-f]{64}$"), platform: Platform = Depends(get_platform)
) -> FileResponse:
    """A package's zip, for a worker that has not cached it yet."""
    if not await platform.store.exists(sha256):
        raise ResourceNotFound(f"package {sha256} is not in the object store")
    # Through a local file, so any object store serves it with the calls it already has; a
    # worker fetches a package once and keeps it.
    fd, name = tempfile.mkstemp(dir=platform.settings.data_dir, prefix=".package-")
    os.close(fd)
    try:
        await platform.store.get_to_file(sha256, Path(name))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise
    return FileResponse(
        name, media_type="application/zip", background=BackgroundTask(os.unlink, name)
    )
