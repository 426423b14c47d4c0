"""The control plane's ASGI application."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from app.auth import KeyCache
from app.billing.routes import router as billing_router
from app.billing.runtime import start_billing, stop_billing
from app.db import Database
from app.errors import LambentError
from app.functions.cache import FunctionCache
from app.functions.routes import router as functions_router
from app.functions.service import restore_provisioned
from app.invocations.fastpath import InvokeFastPath
from app.invocations.routes import router as invocations_router
from app.invocations.writer import open_writer
from app.logging import configure_logging, get_logger
from app.metering.routes import router as usage_router
from app.packages.store import open_object_store
from app.platform import Platform
from app.scheduler.metrics import Metrics
from app.scheduler.processes import ApiProcessRegistry
from app.scheduler.routes import router as operations_router
from app.scheduler.service import Scheduler
from app.settings import Settings, get_settings
from app.tenants.routes import router as tenants_router
from app.tenants.service import ensure_operator_key
from app.workers.routes import internal as workers_internal_router
from app.workers.routes import router as workers_router
from app.workers.service import WorkerRegistry
from workers.agent import Worker, build_worker
from workers.client import InProcessWorkerClient

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
    store = await open_object_store(settings)
    worker: Worker | None = None
    embedded: InProcessWorkerClient | None = None
    if settings.embedded_worker:
        worker = build_worker(settings, store.get_to_file)
        await worker.start()
        embedded = InProcessWorkerClient(worker)
    scheduler = Scheduler(
        [embedded] if embedded is not None else [],
        keepalive_s=settings.keepalive_s,
        capacity_wait_s=settings.capacity_wait_s,
    )
    registry = WorkerRegistry(settings=settings, db=db, scheduler=scheduler, embedded=embedded)
    await registry.start()
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
        workers=registry,
        keys=KeyCache(),
        functions=FunctionCache(),
        metrics=metrics,
    )
    await restore_provisioned(platform)
    # Before the scheduler's first round, so that provisioned concurrency starts divided.
    scheduler.processes = ApiProcessRegistry(platform)
    await scheduler.processes.start()
    scheduler.start()
    platform.writer = open_writer(platform)
    platform.writer.start()
    return platform


async def close_platform(platform: Platform) -> None:
    if platform.scheduler.processes is not None:
        await platform.scheduler.processes.close()
    await platform.scheduler.close()
    if platform.writer is not None:
        await platform.writer.close()
    await platform.workers.close()
    if platform.worker is not None:
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


class LambentApp(FastAPI):
    """The FastAPI application, with the invoke fast path in front of all of its middleware."""

    fast_path: InvokeFastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast_path is not None:
            await self.fast_path(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app_from_env() -> FastAPI:
    """The application of one of `lambent serve --workers N`'s processes."""
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)
    return create_app(settings)


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
        await start_billing(platform)
        log.info("lambent ready", data_dir=str(settings.data_dir.resolve()))
        try:
            yield
        finally:
            await stop_billing(platform)
            await close_platform(platform)

    app = LambentApp(
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
    if settings.invoke_fast_path:
        app.fast_path = InvokeFastPath(partial(FastAPI.__call__, app), app.state)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """200 once the platform can serve."""
        return {"status": "ok"}

    app.include_router(tenants_router)
    app.include_router(functions_router)
    app.include_router(invocations_router)
    app.include_router(usage_router)
    app.include_router(billing_router)
    app.include_router(operations_router)
    app.include_router(workers_router)
    app.include_router(workers_internal_router)
    return app
