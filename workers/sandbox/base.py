from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# Where things appear inside every sandbox, whatever the backend.
TASK_ROOT = "/var/task"
RUNTIME_DIR = "/var/runtime"
API_DIR = "/var/runtime/api"
API_SOCKET = "/var/runtime/api/runtime.sock"


class SandboxStartError(RuntimeError):
    pass


class ImageUnavailable(SandboxStartError):
    """A function's container image is not on the worker and cannot be loaded there."""


@dataclass(frozen=True)
class SandboxSpec:
    instance_id: str
    command: list[str]
    env: dict[str, str]
    # Shown read-only at TASK_ROOT. What is added to it after the start must show inside too:
    # a pre-started sandbox starts with it empty and gets its function's code that way. None
    # for a container image, which holds its code itself.
    code_dir: Path | None
    runtime_dir: Path
    api_dir: Path
    memory_mb: int
    tmp_mb: int
    pids_max: int
    labels: dict[str, str] = field(default_factory=dict)
    runtime: str = ""
    # A container image that brings its own runtime (Docker backend only). Its entry point runs
    # instead of ``command``; it reaches the Runtime API through AWS_LAMBDA_RUNTIME_API.
    image: str | None = None


OutputHandler = Callable[[bytes], None]


class Sandbox(Protocol):
    """One running execution environment, as its backend sees it."""

    instance_id: str

    def set_output_handler(self, handler: OutputHandler) -> None:
        """Deliver everything the sandbox writes to stdout and stderr, in order."""

    def drain_output(self) -> None:
        """Deliver, synchronously, every byte already written; called when a reply arrives."""

    async def wait(self) -> int:
        """Wait for the sandbox to end; its exit status (negative for a signal)."""

    def peak_memory_mb(self) -> int: ...

    def oom_killed(self) -> bool: ...

    async def resize(self, memory_mb: int) -> None:
        """Change the memory limit, and the CPU share that follows it, of the live sandbox."""

    async def destroy(self) -> None:
        """Kill everything inside and release the sandbox's resources; idempotent."""


class SandboxBackend(Protocol):
    name: str

    async def start(self, spec: SandboxSpec) -> Sandbox: ...

    async def close(self) -> None: ...
