"""The control plane's ASGI application."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.auth import KeyCache
from app.db import Database
from app.errors import LambentError
from app.functions.cache import FunctionCache
from app.functions.routes import router as functions_router
from app.functions.service import restore_provisioned
from app.invocations.routes import router as invocations_router
from app.logging import get_logger
from app.metering.routes import router as usage_router
from app.packages.store import LocalObjectStore
from app.platform import Platform
from app.scheduler.metrics import Metrics
from app.scheduler.routes import router as operations_router
from app.scheduler.service import Scheduler
from app.settings import Settings, get_settings
from app.tenants.routes import router as tenants_router
from app.tenants.service import ensure_operator_key
from workers.agent import Worker, WorkerConfig, resolve_sandbox_dir
from workers.client import InProcessWorkerClient
from workers.sandbox.bubblewrap import BubblewrapBackend

log = get_logger(__name__)


class ErrorOut(BaseModel):
    type: str
    message: str


HTTP_ERROR_TYPES = {
    400: "InvalidRequestContentException",
    401: "Unauthorized",
    404: "ResourceNotFound",
    405: "MethodNotAllowed",
    413: "RequestTooLargeException",
    415: "UnsupportedMediaTypeException",
}


def error_response(status: int, type_: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"type": type_, "message": message, **extra}, status_code=status)


def validation_response(errors: list[Any]) -> JSONResponse:
    details = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")), "type": e.get("type")}
        for e in errors
    ]
    message = "; ".join(
        f"{'.'.join(d['loc'][1:] if d['loc'][:1] == ['body'] else d['loc']) or 'body'}: {d['msg']}"
        for d in details
    )
    return error_response(422, "ValidationError", message or "invalid request", errors=details)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LambentError)
    async def _lambent_error(_: Request, exc: LambentError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(list(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _model_validation(_: Request, exc: ValidationError) -> JSONResponse:
        return validation_response(list(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = HTTP_ERROR_TYPES.get(exc.status_code, "HTTPError")
        return error_response(exc.status_code, type_, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", path=request.url.path, exc_info=exc)
        return error_response(500, "ServiceException", "an internal error occurred")


async def build_platform(settings: Settings) -> Platform:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    store = LocalObjectStore(settings.data_dir / "packages")
    sandbox_dir = resolve_sandbox_dir(settings.data_dir, settings.sandbox_dir)
    backend = BubblewrapBackend(
        state_dir=sandbox_dir, sandbox_uid=settings.sandbox_uid, sandbox_gid=settings.sandbox_gid
    )
    worker = Worker(
        WorkerConfig(
            sandbox_dir=sandbox_dir,
            memory_mb=settings.worker_memory_mb,
            python_executable=settings.python_executable,
            tmp_mb=settings.tmp_mb,
            pids_max=settings.pids_max,
            log_max_bytes=settings.log_max_bytes,
            init_timeout_s=settings.init_timeout_s,
            region=settings.region,
        ),
        backend,
        code_source=store.get_to_file,
    )
    await worker.start()
    scheduler = Scheduler(
        [InProcessWorkerClient(worker)],
        keepalive_s=settings.keepalive_s,
        capacity_wait_s=settings.capacity_wait_s,
    )
    metrics = Metrics()
    metrics.watch(scheduler)
    scheduler.on_throttle = lambda spec, reason: metrics.throttles.labels(
        spec.tenant_id, spec.function_name, reason
    ).inc()
    platform = Platform(
        settings=settings,
        db=db,
        store=store,
        scheduler=scheduler,
        worker=worker,
        keys=KeyCache(),
        functions=FunctionCache(),
        metrics=metrics,
    )
    await restore_provisioned(platform)
    scheduler.start()
    return platform


async def close_platform(platform: Platform) -> None:
    await platform.scheduler.close()
    await platform.worker.close()
    await platform.db.dispose()


def announce_operator_key(key: str) -> None:
    print(
        "\n  Lambent generated the operator key. It is shown this once and stored only hashed:\n"
        f"\n      {key}\n\n"
        "  Set LAMBENT_ADMIN_KEY to choose your own.\n",
        file=sys.stdout,
        flush=True,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        platform = await build_platform(settings)
        async with platform.db.sessionmaker() as session:
            admin = settings.admin_key.get_secret_value() if settings.admin_key else None
            generated = await ensure_operator_key(session, admin)
        if generated:
            announce_operator_key(generated)
        app.state.platform = platform
        log.info("lambent ready", data_dir=str(settings.data_dir.resolve()))
        try:
            yield
        finally:
            await close_platform(platform)

    app = FastAPI(
        title="Lambent",
        version="0.1.0",
        description="A self-hosted function-as-a-service platform in the mould of AWS Lambda.",
        lifespan=lifespan,
        responses={
            401: {"model": ErrorOut, "description": "Missing or unknown API key"},
            403: {"model": ErrorOut, "description": "The key may not use this route"},
            404: {"model": ErrorOut, "description": "No such resource for this tenant"},
            422: {"model": ErrorOut, "description": "The request does not match its schema"},
        },
    )
    install_error_handlers(app)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """200 once the platform can serve."""
        return {"status": "ok"}

    app.include_router(tenants_router)
    app.include_router(functions_router)
    app.include_router(invocations_router)
    app.include_router(usage_router)
    app.include_router(operations_router)
    return app
