"""An execution environment: one sandbox, its Runtime API server and its lifecycle."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import replace

from app.logging import get_logger
from workers.protocol import (
    InstanceGone,
    InstanceSpec,
    InstanceStatus,
    InvocationStatus,
    InvokeRequest,
    InvokeResult,
    StartResult,
)
from workers.runtime_api import ResponseTooLarge, RuntimeApiServer, RuntimeGone
from workers.sandbox import Sandbox

log = get_logger(__name__)

ALLOWED_TRANSITIONS = {
    InstanceStatus.STARTING: {InstanceStatus.IDLE, InstanceStatus.STOPPING},
    InstanceStatus.IDLE: {InstanceStatus.BUSY, InstanceStatus.STOPPING},
    InstanceStatus.BUSY: {InstanceStatus.IDLE, InstanceStatus.STOPPING},
    InstanceStatus.STOPPING: {InstanceStatus.STOPPED},
    InstanceStatus.STOPPED: set(),
}


class IllegalTransition(RuntimeError):
    pass


class InstanceBusy(InstanceGone):
    """Handed a second invocation while serving one; the caller should use another instance."""


class LogBuffer:
    """Collects one phase's output, keeping at most ``limit`` bytes and counting the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reset()

    def reset(self) -> None:
        self.chunks: list[bytes] = []
        self.kept = 0
        self.dropped = 0

    def append(self, chunk: bytes) -> None:
        room = self.limit - self.kept
        if room > 0:
            self.chunks.append(chunk[:room])
            self.kept += min(room, len(chunk))
        self.dropped += max(0, len(chunk) - max(room, 0))

    def take(self) -> str:
        if not self.chunks and not self.dropped:
            return ""
        text = b"".join(self.chunks).decode("utf-8", errors="replace")
        if self.dropped:
            if text and not text.endswith("\n"):
                text += "\n"
            text += f"[lambent] log output truncated: {self.dropped} bytes dropped\n"
        self.reset()
        return text


def error_body(error_type: str, message: str) -> bytes:
    return json.dumps({"errorMessage": message, "errorType": error_type}).encode()


class ExecutionEnvironment:
    def __init__(
        self,
        instance_id: str,
        spec: InstanceSpec,
        sandbox: Sandbox,
        api: RuntimeApiServer,
        *,
        log_max_bytes: int,
        on_stopped: Callable[[ExecutionEnvironment], None],
        init_started_ns: int | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.spec = spec
        self.sandbox = sandbox
        self.api = api
        self.status = InstanceStatus.STARTING
        self.started_at = time.time()
        self.last_used_at = self.started_at
        self.invocations = 0
        # perf_counter_ns() when the init phase began: now, unless the caller started it earlier.
        self._started_ns = time.perf_counter_ns() if init_started_ns is None else init_started_ns
        self._logs = LogBuffer(log_max_bytes)
        self._on_stopped = on_stopped
        self._exit_status: int | None = None
        sandbox.set_output_handler(self._logs.append)
        self._watcher = asyncio.create_task(self._watch_sandbox())

    def _transition(self, new: InstanceStatus) -> None:
        if new not in ALLOWED_TRANSITIONS[self.status]:
            raise IllegalTransition(
                f"instance {self.instance_id} cannot go from {self.status} to {new}"
            )
        self.status = new

    async def _watch_sandbox(self) -> None:
        self._exit_status = await self.sandbox.wait()
        self.api.abort(f"runtime exited with status {self._exit_status}")
        if self.status not in (InstanceStatus.STOPPING, InstanceStatus.STOPPED):
            log.info(
                "instance exited",
                instance_id=self.instance_id,
                function=self.spec.function_name,
                exit_status=self._exit_status,
            )
            asyncio.create_task(self.stop())

    async def initialize(self, init_timeout_s: float) -> StartResult:
        """Wait for the runtime's first /next (ready) or its /init/error."""
        failure_type: str | None = None
        failure_body: bytes | None = None
        try:
            failure = await asyncio.wait_for(self.api.wait_init(), timeout=init_timeout_s)
            if failure is not None:
                failure_type, failure_body = failure.error_type, failure.body
        except TimeoutError:
            failure_type = "Sandbox.Timedout"
            failure_body = error_body(
                failure_type, f"Init phase did not finish within {init_timeout_s:g} seconds"
            )
        except RuntimeGone as gone:
            failure_type, failure_body = self._death_error(str(gone))

        init_duration_ns = time.perf_counter_ns() - self._started_ns
        self.sandbox.drain_output()
        init_logs = self._logs.take()
        peak_mb = self.sandbox.peak_memory_mb()
        if failure_type is not None:
            await self.stop()
            return StartResult(
                self.instance_id, init_duration_ns, init_logs, peak_mb, failure_type, failure_body
            )

        self._transition(InstanceStatus.IDLE)
        return StartResult(self.instance_id, init_duration_ns, init_logs, peak_mb)

    def _death_error(self, reason: str) -> tuple[str, bytes]:
        kind = "Runtime.OutOfMemory" if self.sandbox.oom_killed() else "Runtime.ExitError"
        status = self._exit_status
        detail = f"signal: {-status}" if status is not None and status < 0 else reason
        if status is not None and status >= 128:
            detail = f"signal: {status - 128}"
        return kind, error_body(kind, f"Runtime exited with error: {detail}")

    async def invoke(self, request: InvokeRequest) -> InvokeResult:
        # One invocation at a time: a second one is refused rather than queued, so the status,
        # set before the first await, is all the lock there is.
        if self.status is InstanceStatus.BUSY:
            raise InstanceBusy(f"instance {self.instance_id} is serving another invocation")
        if self.status is not InstanceStatus.IDLE:
            raise InstanceGone(f"instance {self.instance_id} is {self.status}")
        self._transition(InstanceStatus.BUSY)
        # What the sandbox wrote since the last invocation, as far as the event loop has
        # read it; the rest is read with this invocation's output, after its reply.
        pre_logs = self._logs.take()
        result = await self._run(request)
        if pre_logs:
            result = replace(result, logs=pre_logs + result.logs)
        self.invocations += 1
        self.last_used_at = time.time()
        if result.instance_alive and self.status is InstanceStatus.BUSY:
            self._transition(InstanceStatus.IDLE)
        else:
            await self.stop()
        return result

    async def _run(self, request: InvokeRequest) -> InvokeResult:
        start_ns = time.perf_counter_ns()
        deadline_ms = int(time.time() * 1000) + request.timeout_s * 1000
        status = InvocationStatus.SUCCESS
        error_type: str | None = None
        alive = True
        too_large = False
        try:
            reply = await self.api.invoke(
                request_id=request.request_id,
                payload=request.payload,
                deadline_ms=deadline_ms,
                function_arn=request.function_arn,
                trace_id=request.trace_id,
                timeout_s=request.timeout_s,
            )
            body = reply.body
            duration_ns = reply.completed_ns - reply.dispatched_ns
            if not reply.ok:
                status, error_type = InvocationStatus.ERROR, reply.error_type or "Unhandled"
        except TimeoutError:
            duration_ns = time.perf_counter_ns() - start_ns
            status, error_type, alive = InvocationStatus.TIMEOUT, "Sandbox.Timedout", False
            body = error_body(
                error_type,
                f"RequestId: {request.request_id} Error: Task timed out after "
                f"{request.timeout_s:.2f} seconds",
            )
        except ResponseTooLarge as exc:
            duration_ns = time.perf_counter_ns() - start_ns
            status, error_type = InvocationStatus.ERROR, "Function.ResponseSizeTooLarge"
            too_large = True
            body = error_body(error_type, str(exc))
        except RuntimeGone as gone:
            duration_ns = time.perf_counter_ns() - start_ns
            status, alive = InvocationStatus.ERROR, False
            error_type, body = self._death_error(str(gone))

        self.sandbox.drain_output()
        return InvokeResult(
            request_id=request.request_id,
            status=status,
            body=body,
            error_type=error_type,
            duration_ns=duration_ns,
            max_memory_used_mb=self.sandbox.peak_memory_mb(),
            logs=self._logs.take(),
            instance_alive=alive,
            response_too_large=too_large,
        )

    async def stop(self) -> None:
        if self.status in (InstanceStatus.STOPPING, InstanceStatus.STOPPED):
            return
        self._transition(InstanceStatus.STOPPING)
        try:
            await self.sandbox.destroy()
            await self.api.stop()
        finally:
            self._transition(InstanceStatus.STOPPED)
            if asyncio.current_task() is not self._watcher:
                self._watcher.cancel()
            self._on_stopped(self)
