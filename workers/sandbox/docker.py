"""The Docker sandbox: one container of the host's Docker engine per instance.

Each container runs as an unprivileged uid (``LAMBENT_SANDBOX_UID``) with every capability
dropped and ``no-new-privileges``, no network but its own loopback (``network_mode="none"``),
a read-only root filesystem from the runtime's image (``workers/images``), the code read-only at
``/var/task``, a size-capped ``/tmp`` in memory, memory and memory+swap limits equal to the
function's memory, a CPU quota that grows with it, a pids limit, and docker-init as PID 1 to
reap what the function leaves behind. Its only way out is the Runtime API's Unix socket, in the
instance's directory, mounted read-only.

Output. Every container starts with lambent-init (``workers/images/lambent-init.c``), which
sends the runtime's stdout and stderr into a FIFO in the instance's directory before it execs
the runtime. The worker reads that FIFO as the process backend reads its pipe, so the output a
runtime wrote before it posted a reply is in the pipe when the reply arrives, and ``drain_output``
delivers all of it. Docker's log stream could not promise that order (it is copied by other
processes, later); the containers log nothing to the engine.

Deaths. One thread follows the engine's events for this worker's containers (``die`` and
``oom``) and resolves each sandbox's ``wait()``; an ``oom`` event always comes before the ``die``
of the same container, since the kernel reports the kill before the container's init sees its
child end.

Memory. The engine puts each container's cgroup below one of its instance,
``/lambent-docker/<instance>``. The container's own group disappears with the container, but the
instance's stays until ``destroy()``, so the peak it recorded for its subtree can still be read
after an out-of-memory kill. A worker that cannot see the host's cgroups (one in a container
without ``/sys/fs/cgroup`` mounted) reports the limit as the peak of an out-of-memory kill and
0 otherwise.

Labels. Containers carry ``lambent.worker`` and ``lambent.instance``, and ``lambent.tenant`` and
``lambent.function`` when they are started for a function. A pre-started container is made before
its function is known and the engine cannot change a container's labels, so it carries
``lambent.prestarted`` (its runtime) instead; the worker knows its function.

Container images. A function may bring its own image, whose entry point is the runtime: it
speaks the Runtime API over TCP at AWS_LAMBDA_RUNTIME_API, as Lambda's images do. lambent-init
listens on that address inside the container before the entry point starts and relays to the
socket. The image keeps its own /var/task and /var/runtime (Lambda's base images keep their
runtime client there), so the socket and lambent-init are mounted under /var/lambent instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import tarfile
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
from docker.types import LogConfig

from app.logging import get_logger
from workers.cgroups import CGROUP_ROOT, FULL_SHARE, MB_PER_VCPU
from workers.images import (
    BUILD_HINT,
    INIT_PATH_IN_IMAGE,
    init_image,
    missing_images,
    required_images,
    runtime_image,
)
from workers.sandbox.base import (
    API_DIR,
    RUNTIME_DIR,
    TASK_ROOT,
    ImageUnavailable,
    OutputHandler,
    SandboxSpec,
    SandboxStartError,
)
from workers.sandbox.output import OutputPipe

log = get_logger(__name__)

T = TypeVar("T")

LABEL_WORKER = "lambent.worker"
LABEL_INSTANCE = "lambent.instance"
CONTAINER_PREFIX = "lambent-"
CGROUP_PARENT = "lambent-docker"

# lambent-init, mounted into every container, and where a container image's sandbox finds the
# Runtime API socket (its own /var/runtime is left alone).
INIT_DIR = "/var/lambent/init"
INIT = f"{INIT_DIR}/lambent-init"
IMAGE_API_DIR = "/var/lambent/api"
OUTPUT_FIFO = "output"
DEFAULT_RUNTIME_API = "127.0.0.1:9001"

# CPU follows Lambda's slope (one vCPU at 1,769 MB) as a hard quota. At that slope a 128 MB
# function would get 7% of a core and its interpreter would take half a second to start, so
# the quota never goes below half a core: flat up to 885 MB, then proportional.
CPU_PERIOD_US = 100_000
MIN_VCPUS = 0.5

# Engine calls block (a container start takes about 0.3 s); they get threads of their own, so
# that a burst of starts does not take asyncio's default executor from everything else.
ENGINE_THREADS = 16
ENGINE_TIMEOUT_S = 60
# How long the event thread waits before following the engine again after losing it.
EVENTS_RETRY_S = 1.0


def cpu_quota_us(memory_mb: int, cpus: int) -> int:
    vcpus = min(float(cpus), max(MIN_VCPUS, memory_mb / MB_PER_VCPU))
    return int(vcpus * CPU_PERIOD_US)


def cpu_shares(memory_mb: int) -> int:
    # The same weight under contention as the process backend gives.
    return max(2, FULL_SHARE * memory_mb // MB_PER_VCPU)


def instance_cgroup(controller: str, instance_id: str) -> Path:
    """The group of an instance's container in one controller, as the host sees it."""
    return CGROUP_ROOT / controller / CGROUP_PARENT / instance_id


def container_name(instance_id: str) -> str:
    return f"{CONTAINER_PREFIX}{instance_id}"


@dataclass(frozen=True)
class ContainerExit:
    status: int
    oom: bool


class ContainerEvents:
    """Follows the engine's ``die`` and ``oom`` events of one worker's containers on a thread.

    ``watch()`` a container before starting it; its future resolves on the event loop when the
    container ends. After losing the engine the thread follows it again and asks after every
    container still watched, so a death missed meanwhile is not lost.
    """

    def __init__(self, client: docker.DockerClient, worker_id: str) -> None:
        self.client = client
        self.worker_id = worker_id
        self._loop = asyncio.get_running_loop()
        self._watched: dict[str, asyncio.Future[ContainerExit]] = {}
        self._ooms: set[str] = set()
        self._lock = threading.Lock()
        self._stream: Any = None
        self._closed = False
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="docker-events", daemon=True)

    def start(self) -> None:
        self._thread.start()
        # Containers are only started once their deaths can be seen.
        if not self._connected.wait(ENGINE_TIMEOUT_S):
            raise SandboxStartError("the Docker engine's event stream did not answer")

    def watch(self, container_id: str) -> asyncio.Future[ContainerExit]:
        future: asyncio.Future[ContainerExit] = self._loop.create_future()
        with self._lock:
            self._watched[container_id] = future
        return future

    def forget(self, container_id: str) -> None:
        with self._lock:
            self._watched.pop(container_id, None)
            self._ooms.discard(container_id)

    def close(self) -> None:
        self._closed = True
        stream = self._stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()

    def _follow(self) -> None:
        reconnecting = False
        while not self._closed:
            try:
                self._stream = self.client.events(
                    decode=True,
                    filters={
                        "type": "container",
                        "event": ["die", "oom"],
                        "label": f"{LABEL_WORKER}={self.worker_id}",
                    },
                )
                self._connected.set()
                if reconnecting:
                    self._reconcile()
                for event in self._stream:
                    self._on_event(event)
            except Exception as exc:  # noqa: BLE001 - the engine may restart; follow it again
                if self._closed:
                    return
                log.warning("lost the Docker engine's events; following again", error=str(exc))
            if not self._closed:
                reconnecting = True
                time.sleep(EVENTS_RETRY_S)

    def _on_event(self, event: dict[str, Any]) -> None:
        actor = event.get("Actor") or {}
        container_id = actor.get("ID") or event.get("id") or ""
        if event.get("Action") == "oom":
            with self._lock:
                self._ooms.add(container_id)
            return
        status = int((actor.get("Attributes") or {}).get("exitCode", -1))
        with self._lock:
            oom = container_id in self._ooms
            known = container_id in self._watched
        if known and not oom and status == 137:
            # A kill without an oom event of ours yet: the engine's own record decides.
            oom = self._inspect_oom(container_id)
        if known:
            self._resolve(container_id, ContainerExit(status, oom))

    def _inspect_oom(self, container_id: str) -> bool:
        try:
            state = self.client.api.inspect_container(container_id)["State"]
        except docker.errors.DockerException:
            return False
        return bool(state.get("OOMKilled"))

    def _reconcile(self) -> None:
        with self._lock:
            watched = list(self._watched)
        for container_id in watched:
            try:
                state = self.client.api.inspect_container(container_id)["State"]
            except docker.errors.NotFound:
                self._resolve(container_id, ContainerExit(-1, False))
                continue
            except docker.errors.DockerException:
                continue
            if state.get("Status") in ("exited", "dead"):
                exit_ = ContainerExit(int(state.get("ExitCode", -1)), bool(state.get("OOMKilled")))
                self._resolve(container_id, exit_)

    def _resolve(self, container_id: str, exit_: ContainerExit) -> None:
        def resolve() -> None:
            with self._lock:
                future = self._watched.get(container_id)
            if future is not None and not future.done():
                future.set_result(exit_)

        self._loop.call_soon_threadsafe(resolve)


class DockerSandbox:
    def __init__(
        self,
        backend: DockerBackend,
        instance_id: str,
        container_id: str,
        output: OutputPipe,
        exited: asyncio.Future[ContainerExit],
        memory_mb: int,
    ) -> None:
        self.instance_id = instance_id
        self.container_id = container_id
        self.backend = backend
        self._output = output
        self._exited = exited
        self.memory_mb = memory_mb
        self._destroyed = False
        self._peak_mb = 0

    def set_output_handler(self, handler: OutputHandler) -> None:
        self._output.set_handler(handler)

    def drain_output(self) -> None:
        self._output.drain()

    async def wait(self) -> int:
        return (await asyncio.shield(self._exited)).status

    def peak_memory_mb(self) -> int:
        if self._destroyed:
            return self._peak_mb
        path = instance_cgroup("memory", self.instance_id) / "memory.max_usage_in_bytes"
        try:
            peak_mb = -(-int(path.read_text()) // (1024 * 1024))
        except (OSError, ValueError):
            return self.memory_mb if self.oom_killed() else 0
        # The instance's group also counts a few pages the kernel charges to it directly; the
        # container itself never held more than its limit.
        return min(peak_mb, self.memory_mb)

    def oom_killed(self) -> bool:
        return self._exited.done() and self._exited.result().oom

    async def resize(self, memory_mb: int) -> None:
        limit = memory_mb * 1024 * 1024
        await self.backend.run(
            self.backend.client.api.update_container,
            self.container_id,
            mem_limit=limit,
            memswap_limit=limit,
            cpu_quota=cpu_quota_us(memory_mb, self.backend.cpus),
            cpu_shares=cpu_shares(memory_mb),
        )
        self.memory_mb = memory_mb

    async def destroy(self) -> None:
        if self._destroyed:
            return
        self._peak_mb = self.peak_memory_mb()
        self._destroyed = True
        try:
            await self.backend.remove_container(self.container_id, self.instance_id)
        finally:
            self.backend.events_forget(self.container_id)
            if not self._exited.done():
                # Killed by the removal; its event no longer matters to anyone.
                self._exited.set_result(ContainerExit(137, False))
            self._output.drain()
            self._output.close()


class DockerBackend:
    name = "docker"

    def __init__(
        self,
        *,
        state_dir: Path,
        sandbox_uid: int,
        sandbox_gid: int,
        worker_id: str,
        runtimes: Iterable[str],
        client: docker.DockerClient | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.user = f"{sandbox_uid}:{sandbox_gid}"
        self.worker_id = worker_id
        self.runtimes = tuple(runtimes)
        try:
            self.client = client or docker.from_env(
                max_pool_size=ENGINE_THREADS, timeout=ENGINE_TIMEOUT_S
            )
            self.client.ping()
            info = self.client.info()
        except docker.errors.DockerException as exc:
            raise SandboxStartError(
                f"the Docker sandbox cannot reach the Docker engine: {exc}. Start dockerd, or "
                "point DOCKER_HOST at it"
            ) from exc
        missing = missing_images(self.client, required_images(self.runtimes))
        if missing:
            raise SandboxStartError(
                f"the Docker sandbox needs the images {', '.join(missing)}; {BUILD_HINT}"
            )
        self.cpus = int(info.get("NCPU") or os.cpu_count() or 1)
        # With the systemd driver a parent would have to be a slice; peaks then come from the
        # fallback described above.
        self.cgroupfs = info.get("CgroupDriver") == "cgroupfs"
        self.init_dir = state_dir / "init"
        self._executor = ThreadPoolExecutor(ENGINE_THREADS, thread_name_prefix="docker")
        self._events: ContainerEvents | None = None
        self._image_locks: dict[str, asyncio.Lock] = {}
        try:
            self._install_init()
            self._remove_leftovers()
        except docker.errors.DockerException as exc:
            raise SandboxStartError(f"the Docker sandbox could not start: {exc}") from exc

    # Start-up.

    def _install_init(self) -> None:
        """Copy lambent-init out of its image, where the engine can mount it from."""
        container = self.client.api.create_container(init_image(), command=[INIT_PATH_IN_IMAGE])
        try:
            chunks, _ = self.client.api.get_archive(container["Id"], INIT_PATH_IN_IMAGE)
            archive = io.BytesIO(b"".join(chunks))
        finally:
            self.client.api.remove_container(container["Id"], force=True)
        with tarfile.open(fileobj=archive) as tar:
            member = tar.extractfile(os.path.basename(INIT_PATH_IN_IMAGE))
            assert member is not None
            binary = member.read()
        self.init_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.init_dir, 0o755)
        fd, tmp = tempfile.mkstemp(dir=self.init_dir, prefix=".lambent-init-")
        with os.fdopen(fd, "wb") as out:
            out.write(binary)
        os.chmod(tmp, 0o755)
        os.replace(tmp, self.init_dir / "lambent-init")

    def _remove_leftovers(self) -> None:
        """Remove the containers a previous run of this worker left behind (it crashed)."""
        leftovers = self.client.api.containers(
            all=True, filters={"label": f"{LABEL_WORKER}={self.worker_id}"}
        )
        for container in leftovers:
            instance_id = (container.get("Labels") or {}).get(LABEL_INSTANCE, "")
            try:
                self._remove_sync(container["Id"], instance_id)
            except docker.errors.DockerException as exc:
                log.warning(
                    "could not remove a container left by a previous run",
                    container_id=container["Id"][:12],
                    error=str(exc),
                )
                continue
            log.info(
                "removed a container left by a previous run",
                instance_id=instance_id,
                worker_id=self.worker_id,
            )

    def _watching(self) -> ContainerEvents:
        if self._events is None:
            self._events = ContainerEvents(self.client, self.worker_id)
            self._events.start()
        return self._events

    def events_forget(self, container_id: str) -> None:
        if self._events is not None:
            self._events.forget(container_id)

    async def run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking engine call on the backend's threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(call, *args, **kwargs))

    # Images brought by functions.

    async def ensure_image(
        self,
        image: str,
        archive_sha256: str | None,
        fetch: Callable[[str, Path], Awaitable[None]],
    ) -> None:
        """Make ``image`` present: load its archive (``docker load``) if it is not.

        An image given by reference, without an archive, must already be on the engine.
        """
        if not archive_sha256:
            # By name only: the engine would also take an id or an id's prefix, and run any
            # image at all.
            if not await self.run(self._has_name, image):
                raise ImageUnavailable(f"no image is named {image} on this worker's engine")
            return
        if await self.run(self._has_image, image):
            return
        lock = self._image_locks.setdefault(image, asyncio.Lock())
        async with lock:
            if await self.run(self._has_image, image):
                return
            fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=".image-")
            os.close(fd)
            try:
                await fetch(archive_sha256, Path(tmp))
                await self.run(self._load, Path(tmp))
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            if not await self.run(self._has_image, image):
                raise ImageUnavailable(f"loading archive {archive_sha256} did not give {image}")
            log.info("container image loaded", image=image, archive_sha256=archive_sha256)

    async def has_image(self, reference: str) -> bool:
        """Whether an image of that name (not id) is on the engine."""
        return await self.run(self._has_name, reference)

    def _has_name(self, reference: str) -> bool:
        name = reference if ":" in reference.rpartition("/")[2] else f"{reference}:latest"
        try:
            tags = self.client.api.inspect_image(name).get("RepoTags") or []
        except docker.errors.ImageNotFound:
            return False
        return name in tags

    def _has_image(self, image: str) -> bool:
        try:
            self.client.api.inspect_image(image)
        except docker.errors.ImageNotFound:
            return False
        return True

    def _load(self, archive: Path) -> None:
        with archive.open("rb") as data:
            for message in self.client.api.load_image(data):
                if isinstance(message, dict) and message.get("error"):
                    raise ImageUnavailable(f"docker load failed: {message['error']}")

    # Instances.

    async def start(self, spec: SandboxSpec) -> DockerSandbox:
        events = self._watching()
        fifo = spec.api_dir / OUTPUT_FIFO
        os.mkfifo(fifo)
        # Written to by the sandbox uid, read by nobody but the worker.
        os.chmod(fifo, 0o622)
        # Read and write: the worker holds a writer itself, so the FIFO never reads as ended,
        # and a runtime's open never waits for a reader.
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        name = container_name(spec.instance_id)
        try:
            if spec.image is not None:
                config = await self.run(self._image_container, spec)
            else:
                config = self._runtime_container(spec)
            container_id = (await self.run(self.client.api.create_container, name=name, **config))[
                "Id"
            ]
        except BaseException as exc:
            os.close(fd)
            # A cancelled create may still have made the container: it is found by name.
            await asyncio.shield(self.remove_container(name, spec.instance_id))
            if isinstance(exc, docker.errors.DockerException):
                raise SandboxStartError(f"could not create the container: {exc}") from exc
            raise

        sandbox = DockerSandbox(
            self, spec.instance_id, container_id, OutputPipe(fd), events.watch(container_id),
            spec.memory_mb,
        )  # fmt: skip
        try:
            await self.run(self.client.api.start, container_id)
        except BaseException as exc:
            await asyncio.shield(sandbox.destroy())
            if isinstance(exc, docker.errors.DockerException):
                raise SandboxStartError(f"could not start the container: {exc}") from exc
            raise
        log.debug("container started", instance_id=spec.instance_id, container_id=container_id)
        return sandbox

    def _host_config(self, spec: SandboxSpec, binds: list[str]) -> dict[str, Any]:
        limit = spec.memory_mb * 1024 * 1024
        return self.client.api.create_host_config(
            binds=[*binds, f"{self.init_dir}:{INIT_DIR}:ro"],
            network_mode="none",
            read_only=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            pids_limit=spec.pids_max,
            mem_limit=limit,
            memswap_limit=limit,
            cpu_period=CPU_PERIOD_US,
            cpu_quota=cpu_quota_us(spec.memory_mb, self.cpus),
            cpu_shares=cpu_shares(spec.memory_mb),
            # Executable, as Lambda's /tmp is; the size counts against the memory limit.
            tmpfs={"/tmp": f"size={spec.tmp_mb}m,mode=1777,exec"},
            init=True,
            cgroup_parent=f"/{CGROUP_PARENT}/{spec.instance_id}" if self.cgroupfs else None,
            log_config=LogConfig(type=LogConfig.types.NONE),
        )

    def _labels(self, spec: SandboxSpec) -> dict[str, str]:
        return {**spec.labels, LABEL_WORKER: self.worker_id, LABEL_INSTANCE: spec.instance_id}

    def _runtime_container(self, spec: SandboxSpec) -> dict[str, Any]:
        if spec.runtime not in self.runtimes or spec.code_dir is None:
            raise SandboxStartError(f"the Docker sandbox has no image for runtime {spec.runtime!r}")
        binds = [
            f"{spec.code_dir}:{TASK_ROOT}:ro",
            f"{spec.runtime_dir}:{RUNTIME_DIR}:ro",
            f"{spec.api_dir}:{API_DIR}:ro",
        ]
        return {
            "image": runtime_image(spec.runtime),
            "command": [INIT, "--output", f"{API_DIR}/{OUTPUT_FIFO}", "--", *spec.command],
            "user": self.user,
            "environment": spec.env,
            "working_dir": TASK_ROOT,
            "hostname": "sandbox",
            "labels": self._labels(spec),
            "host_config": self._host_config(spec, binds),
        }

    def _image_container(self, spec: SandboxSpec) -> dict[str, Any]:
        assert spec.image is not None
        try:
            config = self.client.api.inspect_image(spec.image)["Config"] or {}
        except docker.errors.ImageNotFound:
            raise ImageUnavailable(f"the image {spec.image} is not on this worker") from None
        entrypoint = list(config.get("Entrypoint") or [])
        cmd = list(config.get("Cmd") or [])
        if not entrypoint and not cmd:
            raise SandboxStartError(f"the image {spec.image} has neither ENTRYPOINT nor CMD")
        socket_path = f"{IMAGE_API_DIR}/runtime.sock"
        address = spec.env.get("AWS_LAMBDA_RUNTIME_API", DEFAULT_RUNTIME_API)
        env = {**spec.env, "LAMBENT_RUNTIME_SOCKET": socket_path}
        # Lambda sets _HANDLER of an image function from its command.
        if not env.get("_HANDLER") and cmd:
            env["_HANDLER"] = cmd[0]
        return {
            "image": spec.image,
            "entrypoint": [
                INIT,
                "--output",
                f"{IMAGE_API_DIR}/{OUTPUT_FIFO}",
                "--relay",
                f"{address}={socket_path}",
                "--",
                *entrypoint,
            ],  # fmt: skip
            "command": cmd,
            "user": self.user,
            "environment": env,
            "working_dir": config.get("WorkingDir") or "/",
            "hostname": "sandbox",
            "labels": self._labels(spec),
            "host_config": self._host_config(spec, [f"{spec.api_dir}:{IMAGE_API_DIR}:ro"]),
        }

    async def remove_container(self, container: str, instance_id: str) -> None:
        await self.run(self._remove_sync, container, instance_id)

    def _remove_sync(self, container: str, instance_id: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            self.client.api.remove_container(container, force=True)
        if instance_id:
            # The engine leaves the instance's parent groups; nothing is inside them any more.
            for path in CGROUP_ROOT.glob(f"*/{CGROUP_PARENT}/{instance_id}"):
                with contextlib.suppress(OSError):
                    path.rmdir()

    async def close(self) -> None:
        if self._events is not None:
            self._events.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()
