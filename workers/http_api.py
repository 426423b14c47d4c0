"""A worker's HTTP API: how a control plane on another host starts, invokes and stops instances.

Every call carries ``Authorization: Bearer <worker token>``. An invocation travels as the raw
event in the request body with its metadata in headers, and comes back as the raw response
followed by the logs, so neither is copied through JSON or base64 on the warm path. Starting an
instance is rarer and travels as JSON.

Every answer carries ``X-Reserved: <seq>:<mb>:<idle mb>``: the snapshot's sequence number,
the memory the worker has reserved, and how much of it idle instances hold that the worker would
stop to make room. So the caller's view of free memory is never older than its last call.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import web

from app.logging import get_logger
from workers.agent import InstanceInfo, Worker
from workers.protocol import (
    InstanceGone,
    InstanceSpec,
    InstanceStatus,
    InvocationStatus,
    InvokeRequest,
    InvokeResult,
    NoRoom,
    StartResult,
)

log = get_logger(__name__)

# An event and a response are at most 6 MB each; logs add at most a few hundred KB.
MAX_BODY_BYTES = 8 * 1024 * 1024

RESERVED = "X-Reserved"
REQUEST_ID = "X-Request-Id"
TIMEOUT_S = "X-Timeout-S"
FUNCTION_ARN = "X-Function-Arn"
TRACE_ID = "X-Trace-Id"
STATUS = "X-Status"
ERROR_TYPE = "X-Error-Type"
DURATION_NS = "X-Duration-Ns"
MAX_MEMORY_MB = "X-Max-Memory-Mb"
INSTANCE_ALIVE = "X-Instance-Alive"
TOO_LARGE = "X-Response-Too-Large"
BODY_BYTES = "X-Body-Bytes"

WORKER_KEY = web.AppKey("worker", Worker)
IDENTITY_KEY = web.AppKey("identity", dict)


# The wire format, shared by this API and its client.


def invoke_headers(request: InvokeRequest) -> dict[str, str]:
    return {
        REQUEST_ID: request.request_id,
        TIMEOUT_S: str(request.timeout_s),
        FUNCTION_ARN: request.function_arn,
        TRACE_ID: request.trace_id,
    }


def invoke_request(headers: Any, payload: bytes) -> InvokeRequest:
    return InvokeRequest(
        request_id=headers[REQUEST_ID],
        payload=payload,
        timeout_s=int(headers[TIMEOUT_S]),
        function_arn=headers.get(FUNCTION_ARN, ""),
        trace_id=headers.get(TRACE_ID, ""),
    )


def result_headers(result: InvokeResult) -> dict[str, str]:
    headers = {
        STATUS: result.status.value,
        DURATION_NS: str(result.duration_ns),
        MAX_MEMORY_MB: str(result.max_memory_used_mb),
        INSTANCE_ALIVE: "1" if result.instance_alive else "0",
        TOO_LARGE: "1" if result.response_too_large else "0",
        BODY_BYTES: str(len(result.body)),
    }
    if result.error_type is not None:
        # A handler's exception type is the tenant's class name, which may be any identifier.
        headers[ERROR_TYPE] = quote(result.error_type, safe="")
    return headers


def invoke_result(request_id: str, headers: Any, content: bytes) -> InvokeResult:
    body_bytes = int(headers[BODY_BYTES])
    error_type = headers.get(ERROR_TYPE)
    return InvokeResult(
        request_id=request_id,
        status=InvocationStatus(headers[STATUS]),
        body=content[:body_bytes],
        error_type=None if error_type is None else unquote(error_type),
        duration_ns=int(headers[DURATION_NS]),
        max_memory_used_mb=int(headers[MAX_MEMORY_MB]),
        logs=content[body_bytes:].decode("utf-8", errors="replace"),
        instance_alive=headers[INSTANCE_ALIVE] == "1",
        response_too_large=headers[TOO_LARGE] == "1",
    )


def start_result_json(start: StartResult) -> dict[str, Any]:
    body = dataclasses.asdict(start)
    if start.init_error_body is not None:
        body["init_error_body"] = base64.b64encode(start.init_error_body).decode()
    return body


def start_result(body: dict[str, Any]) -> StartResult:
    error_body = body.get("init_error_body")
    return StartResult(
        **{**body, "init_error_body": None if error_body is None else base64.b64decode(error_body)}
    )


def instance_info_json(info: InstanceInfo) -> dict[str, Any]:
    return {**dataclasses.asdict(info), "status": str(info.status)}


def instance_info(body: dict[str, Any]) -> InstanceInfo:
    return InstanceInfo(**{**body, "status": InstanceStatus(body["status"])})


def parse_reserved(value: str) -> tuple[int, int, int]:
    """(seq, reserved MB, idle MB); a worker that does not say idle MB has none to give."""
    seq, reserved_mb, *idle_mb = value.split(":")
    return int(seq), int(reserved_mb), int(idle_mb[0]) if idle_mb else 0


# The server.


def _error(status: int, type_: str, message: str, worker: Worker) -> web.Response:
    return web.json_response(
        {"type": type_, "message": message}, status=status, headers=_reserved(worker)
    )


def _reserved(worker: Worker) -> dict[str, str]:
    return {RESERVED: f"{worker.reservation_seq}:{worker.reserved_mb}:{worker.idle_mb}"}


def _authenticator(token: str):  # type: ignore[no-untyped-def]
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def authenticate(request: web.Request, handler):  # type: ignore[no-untyped-def]
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return web.json_response(
                {"type": "Unauthorized", "message": "send the worker token as a bearer key"},
                status=401,
            )
        return await handler(request)

    return authenticate


async def health(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    usage = worker.usage()
    body = {
        **request.app[IDENTITY_KEY],
        "reserved_mb": usage.reserved_mb,
        "seq": usage.seq,
        "instances": usage.instances,
        "draining": usage.draining,
        "idle_mb": usage.idle_mb,
    }
    return web.json_response(body, headers=_reserved(worker))


async def list_instances(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    body = {"instances": [instance_info_json(info) for info in worker.instances()]}
    return web.json_response(body, headers=_reserved(worker))


async def start_instance(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    try:
        body = await request.json()
        spec = InstanceSpec(**body["spec"])
        provisioned = bool(body.get("provisioned", False))
    except (ValueError, KeyError, TypeError) as exc:
        return _error(400, "InvalidRequest", f"not an instance spec: {exc}", worker)

    try:
        start = await worker.start_instance(spec, provisioned=provisioned)
    except NoRoom as exc:
        return _error(503, "NoRoom", str(exc), worker)
    except Exception as exc:  # noqa: BLE001 - reported to the caller, which raises it there
        log.exception("starting an instance failed", function=spec.function_name)
        return _error(500, "WorkerError", f"{type(exc).__name__}: {exc}", worker)
    return web.json_response(start_result_json(start), status=201, headers=_reserved(worker))


async def invoke(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    try:
        invocation = invoke_request(request.headers, await request.read())
    except (KeyError, ValueError) as exc:
        return _error(400, "InvalidRequest", f"missing invocation header: {exc}", worker)

    try:
        result = await worker.invoke(request.match_info["instance_id"], invocation)
    except InstanceGone as exc:
        return _error(404, "InstanceGone", str(exc), worker)
    except Exception as exc:  # noqa: BLE001 - reported to the caller, which raises it there
        log.exception("invocation failed in the worker", request_id=invocation.request_id)
        return _error(500, "WorkerError", f"{type(exc).__name__}: {exc}", worker)
    headers = result_headers(result)
    headers.update(_reserved(worker))
    return web.Response(body=result.body + result.logs.encode(), headers=headers)


async def keep_instances(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    try:
        instance_ids = [str(i) for i in (await request.json())["instance_ids"]]
    except (ValueError, KeyError, TypeError) as exc:
        return _error(400, "InvalidRequest", f"not a list of instance ids: {exc}", worker)
    gone = worker.keep_instances(instance_ids)
    return web.json_response({"gone": gone}, headers=_reserved(worker))


async def stop_instance(request: web.Request) -> web.Response:
    worker = request.app[WORKER_KEY]
    await worker.stop_instance(request.match_info["instance_id"])
    return web.Response(status=204, headers=_reserved(worker))


def create_app(worker: Worker, token: str, identity: dict[str, Any]) -> web.Application:
    """The API of ``worker``; ``identity`` (id, boot id, capacity, ...) is part of /v1/health."""
    app = web.Application(middlewares=[_authenticator(token)], client_max_size=MAX_BODY_BYTES)
    app[WORKER_KEY] = worker
    app[IDENTITY_KEY] = identity
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/instances", list_instances)
    app.router.add_post("/v1/instances", start_instance)
    app.router.add_post("/v1/instances/keep", keep_instances)
    app.router.add_post("/v1/instances/{instance_id}/invoke", invoke)
    app.router.add_delete("/v1/instances/{instance_id}", stop_instance)
    return app
