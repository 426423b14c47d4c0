"""A worker: runs the execution environments of one host.

The control plane reaches it through a ``WorkerClient``; inside ``lambent serve`` that client
calls this object directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from app.logging import get_logger
from app.packages.validation import PackageLimits, extract_zip
from app.settings import Settings
from workers import cgroups
from workers.environment import ExecutionEnvironment, error_body
from workers.prestart import PrestartPool
from workers.protocol import (
    InstanceGone,
    InstanceSpec,
    InstanceStatus,
    InvokeRequest,
    InvokeResult,
    NoRoom,
    StartResult,
)
from workers.runtime_api import RuntimeApiServer
from workers.sandbox import SandboxBackend, SandboxSpec
from workers.sandbox.base import API_SOCKET, RUNTIME_DIR, TASK_ROOT, ImageUnavailable
from workers.sandbox.bubblewrap import BubblewrapBackend

log = get_logger(__name__)

RUNTIME_SOURCE = Path(__file__).resolve().parent / "runtimes"
RUNTIME_API_ADDRESS = "127.0.0.1:9001"
SUPPORTED_RUNTIMES = ("python3.11", "nodejs20.x", "provided")
# The init error of a container image function whose image the worker cannot get.
IMAGE_NOT_FOUND = "Lambent.ImageNotFound"

# An instance started this recently and not yet invoked is about to be: the first invocation
# of the API process that started it is on its way, so the worker does not stop it for room.
FIRST_INVOCATION_GRACE_S = 2.0

# Fetches a package blob (by SHA-256) to a local file.
CodeSource = Callable[[str, Path], Awaitable[None]]


class WorkerFull(NoRoom):
    pass


class WorkerDraining(NoRoom):
    """The worker is shutting down: it finishes what runs and starts nothing new."""


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
    node_executable: Path = Path("/usr/bin/node")
    package_limits: PackageLimits = PackageLimits()
    # Pre-started sandboxes kept per runtime (workers/prestart.py); 0 keeps none.
    prestart_pool_size: int = 0
    # Idle instances are stopped by the worker itself after this (see ``idle_backstop_s``);
    # None leaves stopping them to the control plane alone.
    idle_backstop_s: float | None = None


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


@dataclass(frozen=True)
class WorkerUsage:
    """What the worker holds, in one snapshot. A higher ``seq`` is a later snapshot."""

    reserved_mb: int
    seq: int
    instances: dict[str, int]  # by status
    draining: bool
    idle_mb: int = 0  # of idle instances the worker would stop to make room


def idle_backstop_s(keepalive_s: float) -> float:
    """How long an instance may sit idle before its worker stops it on its own.

    The API process that started an instance stops it after ``LAMBENT_KEEPALIVE_S`` idle,
    looking every tenth of that (at most every 30 s). The margin outlasts that look, so the
    worker stops only instances that no API process looks after any more: those of one that
    crashed or restarted. No API process stops them for it, since they could be another's.
    """
    return keepalive_s + min(max(keepalive_s / 2, 1.0), 60.0)


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
    def __init__(
        self,
        config: WorkerConfig,
        backend: SandboxBackend,
        code_source: CodeSource,
        *,
        worker_id: str | None = None,
    ):
        self.worker_id = worker_id or uuid.uuid4().hex[:12]
        self.config = config
        self.backend = backend
        self.code_source = code_source
        self.environments: dict[str, ExecutionEnvironment] = {}
        self.reserved_mb = 0
        # Bumped whenever reserved_mb changes, so a reader of several snapshots (a remote
        # control plane) can tell which one is the latest.
        self.reservation_seq = 0
        self.draining = False
        # When each instance was last started, invoked or kept (monotonic), and when an API
        # process last said that it keeps the instance for provisioned concurrency.
        self._touched: dict[str, float] = {}
        self._kept: dict[str, float] = {}
        self._backstop: asyncio.Task[None] | None = None
        self._code_locks: dict[str, asyncio.Lock] = {}
        self.code_dir = config.sandbox_dir / "code"
        self.runtime_dir = config.sandbox_dir / "runtime"
        self.instances_dir = config.sandbox_dir / "instances"
        self.prestart = (
            PrestartPool(self, SUPPORTED_RUNTIMES, config.prestart_pool_size)
            if config.prestart_pool_size > 0
            else None
        )

    async def start(self) -> None:
        await asyncio.to_thread(self._prepare_dirs)
        if self.prestart is not None:
            await self.prestart.start()
        if self.config.idle_backstop_s is not None:
            self._backstop = asyncio.create_task(self._stop_abandoned(self.config.idle_backstop_s))
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
        if self.instances_dir.is_dir():
            for leftover in self.instances_dir.iterdir():
                self._remove_leftover_sandbox(leftover.name)
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

    def _remove_leftover_sandbox(self, instance_id: str) -> None:
        """Kill and remove a sandbox that a previous run of this worker left behind.

        The backend interface only reaps sandboxes it started itself; the process backend's
        groups are named after the instance, so the ones of this worker's old instance
        directories are found without touching another worker's on the same host.
        """
        group = cgroups.InstanceCgroup(instance_id)
        if self.backend.name != "process" or not any(p.exists() for p in group.paths.values()):
            return
        try:
            group.destroy()
        except OSError as exc:
            log.warning(
                "could not remove a sandbox left by a previous run",
                instance_id=instance_id,
                error=str(exc),
            )
            return
        log.info("removed a sandbox left by a previous run", instance_id=instance_id)

    @property
    def free_mb(self) -> int:
        return self.config.memory_mb - self.reserved_mb

    def _reserve(self, memory_mb: int) -> None:
        self.reserved_mb += memory_mb
        self.reservation_seq += 1

    @property
    def idle_mb(self) -> int:
        """Memory of the idle instances this worker would stop to make room for a new one."""
        now = time.monotonic()
        return sum(e.spec.memory_mb for e in self.environments.values() if self._can_stop(e, now))

    def usage(self) -> WorkerUsage:
        counts = Counter(str(e.status) for e in self.environments.values())
        return WorkerUsage(
            self.reserved_mb, self.reservation_seq, dict(counts), self.draining, self.idle_mb
        )

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
        if runtime == "nodejs20.x":
            return [str(self.config.node_executable), f"{RUNTIME_DIR}/nodejs/bootstrap.mjs"]
        if runtime == "provided":
            return [python, f"{RUNTIME_DIR}/relay.py", "--", f"{TASK_ROOT}/bootstrap"]
        raise ValueError(f"unsupported runtime {runtime!r}")

    def _base_environment(self) -> dict[str, str]:
        """What every runtime starts with, whichever function it is for."""
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "en_US.UTF-8",
            "TZ": ":UTC",
            "LAMBDA_TASK_ROOT": TASK_ROOT,
            "LAMBDA_RUNTIME_DIR": RUNTIME_DIR,
            "AWS_LAMBDA_RUNTIME_API": RUNTIME_API_ADDRESS,
            "AWS_REGION": self.config.region,
            "AWS_DEFAULT_REGION": self.config.region,
            "LAMBENT_RUNTIME_SOCKET": API_SOCKET,
        }

    def _environment(
        self, spec: InstanceSpec, instance_id: str, provisioned: bool
    ) -> dict[str, str]:
        env = {k: v for k, v in spec.environment.items()}
        env.update(self._base_environment())
        if spec.package_type == "Image":
            # A container image keeps its own PATH and locale, and has no Lambda runtime name.
            for name in ("PATH", "LANG"):
                env.pop(name)
        env.update(
            {
                "_HANDLER": spec.handler,
                "AWS_LAMBDA_FUNCTION_NAME": spec.function_name,
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
                "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.function_name}",
                "AWS_LAMBDA_LOG_STREAM_NAME": f"$LATEST/{instance_id}",
                "AWS_LAMBDA_INITIALIZATION_TYPE": (
                    "provisioned-concurrency" if provisioned else "on-demand"
                ),
            }
        )
        if spec.package_type != "Image":
            env["AWS_EXECUTION_ENV"] = f"AWS_Lambda_{spec.runtime}"
        return env

    async def start_instance(self, spec: InstanceSpec, *, provisioned: bool = False) -> StartResult:
        if self.draining:
            raise WorkerDraining(f"worker {self.worker_id} is shutting down")
        if spec.memory_mb > self.free_mb:
            await self._stop_idle_for(spec.memory_mb)

        start = await self._start_instance(spec, provisioned)
        if start.instance_id in self.environments:  # not when its init failed
            now = time.monotonic()
            self._touched[start.instance_id] = now
            if provisioned:
                self._kept[start.instance_id] = now
        return start

    async def _start_instance(self, spec: InstanceSpec, provisioned: bool) -> StartResult:
        if self.prestart is not None:
            prestarted = await self.prestart.start_instance(spec, provisioned=provisioned)
            if prestarted is not None:
                return prestarted
        if spec.memory_mb > self.free_mb:
            raise WorkerFull(
                f"worker {self.worker_id} has {self.free_mb} MB free, {spec.memory_mb} MB needed"
            )
        instance_id = uuid.uuid4().hex
        self._reserve(spec.memory_mb)
        api_dir = self.instances_dir / instance_id
        try:
            if self.prestart is not None:
                await self.prestart.make_room()
            code_dir: Path | None = None
            if spec.package_type == "Image":
                await self._ensure_image(spec)
            else:
                code_dir = await self._code_path(spec.code_sha256)
            api_dir.mkdir(mode=0o755)
            api = RuntimeApiServer(api_dir / "runtime.sock")
            await api.start()
            sandbox_spec = SandboxSpec(
                instance_id=instance_id,
                # An image's own entry point is its runtime.
                command=[] if spec.package_type == "Image" else self._command(spec.runtime),
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
                runtime=spec.runtime,
                image=spec.image if spec.package_type == "Image" else None,
            )
            try:
                sandbox = await self.backend.start(sandbox_spec)
            except BaseException:
                await api.stop()
                raise
        except ImageUnavailable as exc:
            # The function's fault as far as the caller can tell: its image is not to be had.
            self._reserve(-spec.memory_mb)
            shutil.rmtree(api_dir, ignore_errors=True)
            log.warning("image unavailable", function=spec.function_name, error=str(exc))
            return StartResult(
                instance_id,
                0,
                "",
                init_error_type=IMAGE_NOT_FOUND,
                init_error_body=error_body(IMAGE_NOT_FOUND, str(exc)),
            )
        except BaseException:
            self._reserve(-spec.memory_mb)
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

    async def _ensure_image(self, spec: InstanceSpec) -> None:
        ensure_image = getattr(self.backend, "ensure_image", None)
        if ensure_image is None or not spec.image:
            raise ImageUnavailable(
                f"worker {self.worker_id} runs the {self.backend.name} sandbox; container "
                "images need LAMBENT_SANDBOX=docker"
            )
        await ensure_image(spec.image, spec.code_sha256 or None, self.code_source)

    def _forget(self, environment: ExecutionEnvironment) -> None:
        self._touched.pop(environment.instance_id, None)
        self._kept.pop(environment.instance_id, None)
        if self.environments.pop(environment.instance_id, None) is not None:
            self._reserve(-environment.spec.memory_mb)
            shutil.rmtree(self.instances_dir / environment.instance_id, ignore_errors=True)

    def _get(self, instance_id: str) -> ExecutionEnvironment:
        try:
            return self.environments[instance_id]
        except KeyError:
            raise UnknownInstance(instance_id) from None

    async def invoke(self, instance_id: str, request: InvokeRequest) -> InvokeResult:
        environment = self._get(instance_id)
        try:
            return await environment.invoke(request)
        finally:
            if instance_id in self._touched:
                self._touched[instance_id] = time.monotonic()

    async def stop_instance(self, instance_id: str) -> None:
        environment = self.environments.get(instance_id)
        if environment is not None:
            await environment.stop()

    def keep_instances(self, instance_ids: Iterable[str]) -> list[str]:
        """Note that an API process keeps these instances for provisioned concurrency.

        While it keeps saying so (more often than the idle backstop), they are stopped neither
        as abandoned nor to make room. Returns the ids of those this worker no longer runs.
        """
        now = time.monotonic()
        gone: list[str] = []
        for instance_id in instance_ids:
            environment = self.environments.get(instance_id)
            if environment is None or environment.status in (
                InstanceStatus.STOPPING,
                InstanceStatus.STOPPED,
            ):
                gone.append(instance_id)
            elif instance_id in self._touched:
                self._touched[instance_id] = self._kept[instance_id] = now
        return gone

    # Instances nobody stops: every API process stops only the instances it started, so
    # the worker stops the ones whose API process is gone, and makes room on its own.

    def _stoppable(self, now: float) -> list[ExecutionEnvironment]:
        """Idle instances no API process keeps, least recently used first."""
        idle = [e for e in self.environments.values() if self._can_stop(e, now)]
        return sorted(idle, key=lambda e: self._touched.get(e.instance_id, now))

    def _can_stop(self, environment: ExecutionEnvironment, now: float) -> bool:
        touched = self._touched.get(environment.instance_id)
        return (
            environment.status is InstanceStatus.IDLE
            and touched is not None
            and not self._is_kept(environment.instance_id, now)
            and (environment.invocations > 0 or now - touched > FIRST_INVOCATION_GRACE_S)
        )

    def _is_kept(self, instance_id: str, now: float) -> bool:
        kept_at = self._kept.get(instance_id)
        if kept_at is None:
            return False
        return now - kept_at <= (self.config.idle_backstop_s or math.inf)

    async def _stop_idle_for(self, memory_mb: int) -> None:
        """Stop idle instances, least recently used first, until ``memory_mb`` is free.

        They may be any API process's: one that later invokes such an instance hears that it
        is gone and uses another. This is what lets an API process place an instance on a
        worker whose memory is held by idle instances it cannot stop itself.
        """
        stopped = 0
        for environment in self._stoppable(time.monotonic()):
            if self.free_mb >= memory_mb:
                break
            if environment.status is not InstanceStatus.IDLE:  # invoked meanwhile
                continue
            stopped += 1
            await self._stop_quietly(environment)
        if stopped:
            log.info(
                "idle instances stopped to make room",
                worker_id=self.worker_id,
                count=stopped,
                memory_mb=memory_mb,
            )

    async def _stop_abandoned(self, backstop_s: float) -> None:
        """Stop instances idle for longer than ``backstop_s``, for as long as the worker runs."""
        interval_s = min(max(backstop_s / 10, 0.5), 30.0)
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._stop_idle_since(time.monotonic() - backstop_s)
            except Exception:  # noqa: BLE001 - the backstop must outlive one bad round
                log.exception("stopping abandoned instances failed", worker_id=self.worker_id)

    async def _stop_idle_since(self, cutoff: float) -> None:
        for environment in self._stoppable(time.monotonic()):
            touched = self._touched.get(environment.instance_id)
            if touched is not None and touched > cutoff:
                break  # the rest were used more recently
            if touched is None or environment.status is not InstanceStatus.IDLE:
                continue  # stopped or invoked meanwhile
            log.info(
                "instance idle past the keep-alive and its margin; stopping it",
                instance_id=environment.instance_id,
                function=environment.spec.function_name,
                idle_s=round(time.monotonic() - touched, 1),
            )
            await self._stop_quietly(environment)

    async def _stop_quietly(self, environment: ExecutionEnvironment) -> None:
        try:
            await environment.stop()
        except Exception as exc:  # noqa: BLE001 - one sandbox that will not stop stops no other
            log.warning(
                "stopping an idle instance failed",
                instance_id=environment.instance_id,
                error=repr(exc),
            )

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

    async def drain(self, timeout_s: float) -> bool:
        """Start nothing new and wait, at most ``timeout_s``, for running invocations to end.

        True when none is left running.
        """
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self._busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._busy()

    def _busy(self) -> bool:
        return any(e.status is InstanceStatus.BUSY for e in self.environments.values())

    async def close(self) -> None:
        if self._backstop is not None:
            self._backstop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._backstop
        if self.prestart is not None:
            await self.prestart.close()
        await asyncio.gather(
            *(e.stop() for e in list(self.environments.values())), return_exceptions=True
        )
        await self.backend.close()


def worker_id_of(settings: Settings) -> str:
    """The configured id, or one generated on first start and kept in the data dir.

    A stable id lets a worker that restarts after a crash find what it left behind (Docker
    containers are labelled with it).
    """
    if settings.worker_id:
        return settings.worker_id
    path = settings.data_dir / "worker-id"
    if path.is_file():
        return path.read_text().strip()
    worker_id = f"w-{uuid.uuid4().hex[:12]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(worker_id + "\n")
    return worker_id


def build_worker(
    settings: Settings, code_source: CodeSource, *, worker_id: str | None = None
) -> Worker:
    """This host's worker as the settings describe it, embedded or as `lambent worker`."""
    worker_id = worker_id or worker_id_of(settings)
    sandbox_dir = resolve_sandbox_dir(settings.data_dir, settings.sandbox_dir)
    backend: SandboxBackend
    python_executable, node_executable = settings.python_executable, settings.node_executable
    if settings.sandbox == "docker":
        from workers.sandbox.docker import DockerBackend

        sandbox_dir.mkdir(parents=True, exist_ok=True)
        backend = DockerBackend(
            state_dir=sandbox_dir,
            sandbox_uid=settings.sandbox_uid,
            sandbox_gid=settings.sandbox_gid,
            worker_id=worker_id,
            runtimes=SUPPORTED_RUNTIMES,
        )
        # The interpreters of the runtime images, not the host's.
        python_executable, node_executable = Path("/usr/bin/python3"), Path("/usr/bin/node")
    else:
        backend = BubblewrapBackend(
            state_dir=sandbox_dir,
            sandbox_uid=settings.sandbox_uid,
            sandbox_gid=settings.sandbox_gid,
        )
    config = WorkerConfig(
        sandbox_dir=sandbox_dir,
        memory_mb=settings.worker_memory_mb,
        python_executable=python_executable,
        node_executable=node_executable,
        tmp_mb=settings.tmp_mb,
        pids_max=settings.pids_max,
        log_max_bytes=settings.log_max_bytes,
        init_timeout_s=settings.init_timeout_s,
        region=settings.region,
        prestart_pool_size=settings.prestart_pool_size,
        idle_backstop_s=idle_backstop_s(settings.keepalive_s),
    )
    return Worker(config, backend, code_source, worker_id=worker_id)
