"""Invoking a function: schedule it, then record its outcome and usage in one transaction."""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from app.functions import service as functions
from app.functions.cache import CachedFunction
from app.logging import get_logger
from app.metering import recorder
from app.metering.service import billed_ms
from app.platform import Platform
from app.scheduler.service import Scheduled
from workers.protocol import InstanceSpec, InvocationStatus, InvokeRequest, WorkerUnavailable

log = get_logger(__name__)

WORKER_LOST = "Lambent.WorkerLost"


@dataclass(frozen=True)
class InvocationOutcome:
    request_id: str
    status: InvocationStatus
    body: bytes
    error_type: str | None
    response_too_large: bool
    worker_lost: bool = False


def new_ids() -> tuple[str, str]:
    """A new invocation's request id (a random UUID) and its X-Ray style trace header, from one
    draw of randomness (one system call)."""
    random = os.urandom(36)
    request_id = str(uuid.UUID(bytes=random[:16], version=4))
    trace = random[16:].hex()
    return request_id, f"Root=1-{int(time.time()):08x}-{trace[:24]};Parent={trace[24:]};Sampled=0"


def format_ms(ns: int) -> str:
    return f"{ns / 1_000_000:.2f}"


def report_lines(
    request_id: str,
    *,
    duration_ns: int,
    billed: int,
    memory_mb: int,
    max_memory_mb: int,
    init_duration_ns: int | None,
    status: InvocationStatus,
    error_type: str | None,
) -> str:
    report = (
        f"REPORT RequestId: {request_id}\tDuration: {format_ms(duration_ns)} ms\t"
        f"Billed Duration: {billed} ms\tMemory Size: {memory_mb} MB\t"
        f"Max Memory Used: {max_memory_mb} MB\t"
    )
    if init_duration_ns is not None:
        report += f"Init Duration: {format_ms(init_duration_ns)} ms\t"
    if status is InvocationStatus.TIMEOUT:
        report += "Status: timeout\t"
    elif error_type and error_type.startswith(("Runtime.", "Sandbox.")):
        report += f"Status: error\tError Type: {error_type}\t"
    return f"END RequestId: {request_id}\n{report}\n"


async def invoke(platform: Platform, cached: CachedFunction, payload: bytes) -> InvocationOutcome:
    spec = cached.spec
    await recorder.admit(platform, spec.tenant_id)
    limits = await functions.concurrency_limits(platform, spec.tenant_id, cached)
    request_id, trace_id = new_ids()
    started_at = datetime.now(UTC)
    request = InvokeRequest(
        request_id=request_id,
        payload=payload,
        timeout_s=spec.timeout_s,
        function_arn=spec.function_arn,
        trace_id=trace_id,
    )
    worker_lost: WorkerUnavailable | None = None
    try:
        scheduled = await platform.scheduler.invoke(spec, request, limits)
    except WorkerUnavailable as exc:
        # The worker died or stopped answering mid-invocation. Whether the function ran is
        # unknown, so it is recorded (and billed no duration) rather than retried.
        log.warning(
            "worker lost during invocation", request_id=request_id, function=spec.function_name
        )
        worker_lost = exc
        scheduled = Scheduled("", "", False, None, None)

    start = scheduled.start
    init_duration_ns = start.init_duration_ns if start is not None else None
    logs = start.init_logs if start is not None else ""
    if worker_lost is not None:
        status, error_type = InvocationStatus.ERROR, WORKER_LOST
        body = json.dumps(
            {
                "errorMessage": f"the worker stopped answering: {worker_lost}",
                "errorType": WORKER_LOST,
            }
        ).encode()
        duration_ns, max_memory_mb, function_logs, too_large = 0, 0, "", False
    elif scheduled.result is None:
        # The runtime failed to initialise: the invocation never ran.
        assert start is not None and start.init_error_type is not None
        status = InvocationStatus.ERROR
        error_type = start.init_error_type
        body = start.init_error_body or b"{}"
        duration_ns, max_memory_mb, function_logs, too_large = 0, start.peak_memory_mb, "", False
        logs += (
            f"INIT_REPORT Init Duration: {format_ms(start.init_duration_ns)} ms\t"
            f"Phase: init\tStatus: error\tError Type: {error_type}\n"
        )
    else:
        result = scheduled.result
        status, error_type, body = result.status, result.error_type, result.body
        duration_ns, max_memory_mb = result.duration_ns, result.max_memory_used_mb
        function_logs, too_large = result.logs, result.response_too_large

    billed = billed_ms(duration_ns)
    if function_logs and not function_logs.endswith("\n"):
        function_logs += "\n"
    logs += f"START RequestId: {request_id} Version: $LATEST\n" + function_logs
    logs += report_lines(
        request_id,
        duration_ns=duration_ns,
        billed=billed,
        memory_mb=spec.memory_mb,
        max_memory_mb=max_memory_mb,
        init_duration_ns=init_duration_ns,
        status=status,
        error_type=error_type,
    )

    finished_at = max(datetime.now(UTC), started_at + timedelta(microseconds=duration_ns // 1000))
    invocation_row = {
        "request_id": request_id,
        "tenant_id": spec.tenant_id,
        "function_id": spec.function_id,
        "function_name": spec.function_name,
        "status": status.value,
        "error_type": error_type,
        "cold_start": scheduled.cold_start,
        "start_kind": start_kind(scheduled),
        "duration_ns": duration_ns,
        "billed_ms": billed,
        "init_duration_ns": init_duration_ns,
        "memory_mb": spec.memory_mb,
        "max_memory_used_mb": max_memory_mb,
        "instance_id": scheduled.instance_id,
        "logs": logs,
        "started_at": started_at,
        "finished_at": finished_at,
    }
    usage_row = {
        "request_id": request_id,
        "tenant_id": spec.tenant_id,
        "function_id": spec.function_id,
        "function_name": spec.function_name,
        "recorded_at": finished_at,
        "requests": 1,
        "memory_mb": spec.memory_mb,
        "billed_ms": billed,
        "mb_ms": billed * spec.memory_mb,
        "init_billed_ms": billed_ms(init_duration_ns or 0),
    }
    # One transaction: the final status and the usage record exist together or not at all.
    await platform.writer.write(invocation_row, usage_row)

    _observe(platform, spec, scheduled, status, error_type, duration_ns)
    if status is not InvocationStatus.SUCCESS:
        log.info(
            "invocation failed",
            tenant_id=spec.tenant_id,
            function=spec.function_name,
            request_id=request_id,
            error_type=error_type,
        )
    return InvocationOutcome(
        request_id, status, body, error_type, too_large, worker_lost=worker_lost is not None
    )


def _observe(
    platform: Platform,
    spec: InstanceSpec,
    scheduled: Scheduled,
    status: InvocationStatus,
    error_type: str | None,
    duration_ns: int,
) -> None:
    metrics = platform.metrics
    labels = (spec.tenant_id, spec.function_name)
    metrics.child(metrics.invocations, *labels, status.value).inc()
    if error_type is not None:
        metrics.child(metrics.errors, *labels, error_type).inc()
    if scheduled.result is not None:
        metrics.child(metrics.duration, *labels).observe(duration_ns / 1e9)
    if scheduled.cold_start and scheduled.start is not None:
        metrics.child(metrics.cold_starts, *labels).inc()
        init_s = scheduled.start.init_duration_ns / 1e9
        metrics.child(metrics.init_duration, *labels).observe(init_s)
        metrics.child(metrics.queue_wait, *labels).observe(scheduled.queue_wait_s)


def start_kind(scheduled: Scheduled) -> str | None:
    if not scheduled.cold_start or scheduled.start is None:
        return None
    return "prestarted" if scheduled.start.prestarted else "fresh"


def parse_event(payload: bytes) -> bytes:
    """The event as the runtime gets it: JSON, with an empty body meaning ``{}``."""
    if not payload.strip():
        return b"{}"
    json.loads(payload)  # raises ValueError for the route to turn into a 400
    return payload
