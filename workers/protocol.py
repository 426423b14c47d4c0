"""What the control plane and a worker say to each other, whatever carries it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class InstanceGone(RuntimeError):
    """The instance asked for has stopped (or never existed on this worker)."""


class WorkerUnavailable(RuntimeError):
    """The worker cannot be reached, or stopped answering mid-call."""


class WorkerUnreachable(WorkerUnavailable):
    """The call never reached the worker, so nothing ran there: another worker may take it."""


class NoRoom(RuntimeError):
    """The worker takes no new instance now (its memory is taken, or it is shutting down)."""


class InstanceStatus(StrEnum):
    STARTING = "initializing"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"
    STOPPED = "stopped"


class InvocationStatus(StrEnum):
    SUCCESS = "success"
    ERROR = "error"  # the function's own error (or its runtime's)
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class InstanceSpec:
    """Everything a worker needs to start one execution environment of a function version."""

    tenant_id: str
    function_id: str
    function_name: str
    revision: int
    runtime: str
    handler: str
    memory_mb: int
    timeout_s: int
    # The zip package's blob; for a container image, its archive's, or "" for an image given by
    # reference (already on the workers).
    code_sha256: str
    environment: dict[str, str] = field(default_factory=dict)
    function_arn: str = ""
    package_type: str = "Zip"  # or "Image"
    # A container image function's image: an image id for an uploaded archive, else the
    # reference it was created with.
    image: str | None = None


@dataclass(frozen=True)
class StartResult:
    instance_id: str
    init_duration_ns: int
    init_logs: str
    peak_memory_mb: int = 0
    # Set when the runtime failed to initialise; the instance is already gone then.
    init_error_type: str | None = None
    init_error_body: bytes | None = None
    # The instance took over a pre-started sandbox: its init only loaded the function's code.
    prestarted: bool = False


@dataclass(frozen=True)
class InvokeRequest:
    request_id: str
    payload: bytes
    timeout_s: int
    function_arn: str
    trace_id: str


@dataclass(frozen=True)
class InvokeResult:
    request_id: str
    status: InvocationStatus
    body: bytes
    error_type: str | None
    duration_ns: int
    max_memory_used_mb: int
    logs: str
    # False when the instance died or was discarded during this invocation.
    instance_alive: bool
    response_too_large: bool = False
