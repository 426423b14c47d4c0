"""A worker: runs the execution environments of one host.

The control plane reaches it through a ``WorkerClient``; inside ``lambent serve`` that client
calls this object directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from app.logging import get_logger
from app.packages.validation import PackageLimits, extract_zip
from workers.environment import ExecutionEnvironment
from workers.protocol import (
    InstanceGone,
    InstanceSpec,
    InstanceStatus,
    InvokeRequest,
    InvokeResult,
    StartResult,
)
from workers.runtime_api import RuntimeApiServer
from workers.sandbox import SandboxBackend, SandboxSpec
from workers.sandbox.base import API_SOCKET, RUNTIME_DIR, TASK_ROOT

log = get_logger(__name__)

RUNTIME_SOURCE = Path(__file__).resolve().parent / "runtimes"
RUNTIME_API_ADDRESS = "127.0.0.1:9001"
SUPPORTED_RUNTIMES = ("python3.11", "provided")

# Fetches a package blob (by SHA-256) to a local file.
CodeSource = Callable[[str, Path], Awaitable[None]]


class WorkerFull(RuntimeError):
    pass


class UnknownInstance(InstanceGone):
    pass


@dataclass(frozen=True)
class WorkerConfig:
    sandbox_dir: Path
    memory_mb: int
    python_executable: Path
    tmp_mb: int
    pids_max: int
    log_max_bytes: int
    init_timeout_s: float
    region: str = "local"
    package_limits: PackageLimits = PackageLimits()


@dataclass(frozen=True)
class InstanceInfo:
    instance_id: str
    function_id: str
    revision: int
    status: InstanceStatus
    memory_mb: int
    started_at: float
    last_used_at: float
    invocations: int


def resolve_sandbox_dir(data_dir: Path, configured: Path | None) -> Path:
    """A directory the unprivileged sandbox uid can traverse, for code and sockets.

    bwrap runs as that uid, so every directory above a bind-mount source must be searchable by
    it. A data dir under a private home (``/root``) is not; then a directory under /var/lib named
    after the data dir is used instead.
    """
    if configured is not None:
        return configured.resolve()
    data_dir = data_dir.resolve()
    if all(os.stat(p).st_mode & stat.S_IXOTH for p in [data_dir, *data_dir.parents] if p.exists()):
        return data_dir / "sandbox"
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return Path("/var/lib/lambent") / f"sandbox-{digest}"


class Worker:
    def __init__(self, config: WorkerConfig, backend: SandboxBackend, code_source: CodeSource):
        self.worker_id = uuid.uuid4().hex[:12]
        self.config = config
        self.backend = backend
        self.code_source = code_source
        self.environments: dict[str, ExecutionEnvironment] = {}
        self.reserved_mb = 0
        self._code_locks: dict[str, asyncio.Lock] = {}
        self.code_dir = config.sandbox_dir / "code"
        self.runtime_dir = config.sandbox_dir / "runtime"
        self.instances_dir = config.sandbox_dir / "instances"

    async def start(self) -> None:
        await asyncio.to_thread(self._prepare_dirs)
        log.info(
            "worker ready",
            worker_id=self.worker_id,
            sandbox=self.backend.name,
            memory_mb=self.config.memory_mb,
            sandbox_dir=str(self.config.sandbox_dir),
        )

    def _prepare_dirs(self) -> None:
        self.config.sandbox_dir.mkdir(parents=True, exist_ok=True)
        for path in (self.config.sandbox_dir, self.code_dir):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o711)
        # Instance directories hold sockets; nothing stale from a crashed worker is reused.
        shutil.rmtree(self.instances_dir, ignore_errors=True)
        self.instances_dir.mkdir(mode=0o711)
        os.chmod(self.instances_dir, 0o711)

        # The runtime files are copied where the sandbox uid can read them, read-only to all.
        staging = Path(tempfile.mkdtemp(dir=self.config.sandbox_dir, prefix=".runtime-"))
        shutil.copytree(
            RUNTIME_SOURCE,
            staging,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        (staging / "api").mkdir(exist_ok=True)  # mount point of each instance's socket dir
        for root, _dirs, files in os.walk(staging):
            os.chmod(root, 0o755)
            for name in files:
                os.chmod(os.path.join(root, name), 0o644)
        old = self.runtime_dir.with_name(f".runtime-old-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(FileNotFoundError):
            self.runtime_dir.rename(old)
        staging.rename(self.runtime_dir)
        shutil.rmtree(old, ignore_errors=True)

    @property
    def free_mb(self) -> int:
        return self.config.memory_mb - self.reserved_mb

    async def _code_path(self, sha256: str) -> Path:
        dest = self.code_dir / sha256
        if dest.is_dir():
            return dest
        lock = self._code_locks.setdefault(sha256, asyncio.Lock())
        async with lock:
            if not dest.is_dir():
                fd, tmp = tempfile.mkstemp(dir=self.code_dir, prefix=".zip-")
                os.close(fd)
                try:
                    await self.code_source(sha256, Path(tmp))
                    await asyncio.to_thread(
                        extract_zip, Path(tmp), dest, limits=self.config.package_limits
                    )
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
        return dest

    def _command(self, runtime: str) -> list[str]:
        python = str(self.config.python_executable)
        if runtime == "python3.11":
            return [python, "-u", f"{RUNTIME_DIR}/python/bootstrap.py"]
        if runtime == "provided":
            return [python, f"{RUNTIME_DIR}/relay.py", "--", f"{TASK_ROOT}/bootstrap"]
        raise ValueError(f"unsupported runtime {runtime!r}")

    def _environment(
        self, spec: InstanceSpec, instance_id: str, provisioned: bool
    ) -> dict[str, str]:
        env = {k: v for k, v in spec.environment.items()}
        env.update(
            {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "LANG": "en_US.UTF-8",
                "TZ": ":UTC",
                "LAMBDA_TASK_ROOT": TASK_ROOT,
                "LAMBDA_RUNTIME_DIR": RUNTIME_DIR,
                "_HANDLER": spec.handler,
                "AWS_LAMBDA_RUNTIME_API": RUNTIME_API_ADDRESS,
                "AWS_LAMBDA_FUNCTION_NAME": spec.function_name,
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
                "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.function_name}",
                "AWS_LAMBDA_LOG_STREAM_NAME": f"$LATEST/{instance_id}",
                "AWS_LAMBDA_INITIALIZATION_TYPE": (
                    "provisioned-concurrency" if provisioned else "on-demand"
                ),
                "AWS_EXECUTION_ENV": f"AWS_Lambda_{spec.runtime}",
                "AWS_REGION": self.config.region,
                "AWS_DEFAULT_REGION": self.config.region,
                "LAMBENT_RUNTIME_SOCKET": API_SOCKET,
            }
        )
        return env

    async def start_instance(self, spec: InstanceSpec, *, provisioned: bool = False) -> StartResult:
        if spec.memory_mb > self.free_mb:
            raise WorkerFull(
                f"worker {self.worker_id} has {self.free_mb} MB free, {spec.memory_mb} MB needed"
            )
        instance_id = uuid.uuid4().hex
        self.reserved_mb += spec.memory_mb
        api_dir = self.instances_dir / instance_id
        try:
            code_dir = await self._code_path(spec.code_sha256)
            api_dir.mkdir(mode=0o755)
            api = RuntimeApiServer(api_dir / "runtime.sock")
            await api.start()
            sandbox_spec = SandboxSpec(
                instance_id=instance_id,
                command=self._command(spec.runtime),
                env=self._environment(spec, instance_id, provisioned),
                code_dir=code_dir,
                runtime_dir=self.runtime_dir,
                api_dir=api_dir,
                memory_mb=spec.memory_mb,
                tmp_mb=self.config.tmp_mb,
                pids_max=self.config.pids_max,
                labels={
                    "lambent.tenant": spec.tenant_id,
                    "lambent.function": spec.function_id,
                    "lambent.instance": instance_id,
                },
            )
            try:
                sandbox = await self.backend.start(sandbox_spec)
            except BaseException:
                await api.stop()
                raise
        except BaseException:
            self.reserved_mb -= spec.memory_mb
            shutil.rmtree(api_dir, ignore_errors=True)
            raise

        environment = ExecutionEnvironment(
            instance_id,
            spec,
            sandbox,
            api,
            log_max_bytes=self.config.log_max_bytes,
            on_stopped=self._forget,
        )
        self.environments[instance_id] = environment
        log.debug("instance starting", instance_id=instance_id, function=spec.function_name)
        return await environment.initialize(self.config.init_timeout_s)

    def _forget(self, environment: ExecutionEnvironment) -> None:
        if self.environments.pop(environment.instance_id, None) is not None:
            self.reserved_mb -= environment.spec.memory_mb
            shutil.rmtree(self.instances_dir / environment.instance_id, ignore_errors=True)

    def _get(self, instance_id: str) -> ExecutionEnvironment:
        try:
            return self.environments[instance_id]
        except KeyError:
            raise UnknownInstance(instance_id) from None

    async def invoke(self, instance_id: str, request: InvokeRequest) -> InvokeResult:
        return await self._get(instance_id).invoke(request)

    async def stop_instance(self, instance_id: str) -> None:
        environment = self.environments.get(instance_id)
        if environment is not None:
            await environment.stop()

    def instances(self) -> list[InstanceInfo]:
        return [
            InstanceInfo(
                instance_id=e.instance_id,
                function_id=e.spec.function_id,
                revision=e.spec.revision,
                status=e.status,
                memory_mb=e.spec.memory_mb,
                started_at=e.started_at,
                last_used_at=e.last_used_at,
                invocations=e.invocations,
            )
            for e in self.environments.values()
        ]

    async def close(self) -> None:
        await asyncio.gather(
            *(e.stop() for e in list(self.environments.values())), return_exceptions=True
        )
        await self.backend.close()
