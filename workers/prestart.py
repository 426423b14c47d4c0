"""Pre-started sandboxes: cold starts that pay only for loading the function's code.

A worker keeps, per runtime, a few sandboxes whose runtime is already running but which belong
to no function yet. Each one's /var/task is an empty directory, and its runtime waits on the
Runtime API for an assignment. To start an instance of a function in that runtime, the worker
takes one: it links the function's code into that directory, sets the sandbox's memory limit
and CPU share to the function's, and answers the runtime with the function's environment. The
runtime takes that environment as its own and loads the function as a fresh start would, so
the instance's init duration is only that loading.

A pre-started sandbox serves one function and is never given back. While it waits it holds
``POOL_MEMORY_MB`` of the worker's memory, which the worker does not count as taken
(``Worker.free_mb``): a start that needs that memory stops pooled sandboxes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import stat
import time
import uuid
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.logging import get_logger
from workers.environment import ExecutionEnvironment
from workers.protocol import InstanceSpec, StartResult
from workers.runtime_api import RuntimeApiServer
from workers.sandbox import Sandbox, SandboxSpec

if TYPE_CHECKING:
    from workers.agent import Worker

log = get_logger(__name__)

# Functions have at least this much memory, so taking a sandbox only ever raises its limit.
POOL_MEMORY_MB = 128
# How often the pool checks for memory freed by stopped instances, and waits after a failure.
REFILL_CHECK_S = 1.0
RETRY_AFTER_FAILURE_S = 5.0
# After a sandbox is handed to a function, the pool refills only empty runtimes for this long:
# the new instance's first invocation follows its init at once, and a sandbox starting beside it
# (an interpreter start, tens of ms of CPU) would slow that invocation several times over.
REFILL_SETTLE_S = 0.1

# Each runtime's interpreter reads these when it starts, before any assignment; a function that
# sets them needs a fresh interpreter to see them take effect: (prefixes, names).
_INTERPRETER_ENV = {
    "python3.11": (("PYTHON", "LC_", "LD_"), frozenset({"HOME"})),
    "nodejs20.x": (("NODE_", "UV_", "LD_"), frozenset()),
}


@dataclass(eq=False)
class PooledSandbox:
    instance_id: str
    runtime: str
    api: RuntimeApiServer
    sandbox: Sandbox | None = None
    ready: bool = False
    # Given up (for memory, or at close) while still starting; its starter discards it.
    released: bool = False
    # Taken while still starting: its starter hands it over through ``launched`` (True when
    # ready, False when it failed and is gone).
    taken: bool = False
    launched: asyncio.Future[bool] | None = None
    watcher: asyncio.Task[None] | None = None


class PrestartPool:
    """The pre-started sandboxes of one worker, kept at ``size`` per runtime as memory allows."""

    def __init__(self, worker: Worker, runtimes: Iterable[str], size: int) -> None:
        self.worker = worker
        self.runtimes = tuple(runtimes)
        self.size = size
        self.reserved_mb = 0
        self.tasks_dir = worker.config.sandbox_dir / "tasks"
        self._pooled: dict[str, list[PooledSandbox]] = {r: [] for r in self.runtimes}
        self._retry_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        # Sandboxes being handed to functions. Meanwhile only an empty runtime is refilled:
        # starting a sandbox takes CPU from the very cold starts the pool is there to shorten.
        self._assigning = 0
        self._settled_at = 0.0
        self._closed = False

    async def start(self) -> None:
        await asyncio.to_thread(self._prepare_dir)
        self._filler = asyncio.create_task(self._keep_filled())
        log.info("pre-starting sandboxes", runtimes=list(self.runtimes), size=self.size)

    def _prepare_dir(self) -> None:
        # Task directories left by a crashed worker hold nothing anyone still uses.
        shutil.rmtree(self.tasks_dir, ignore_errors=True)
        self.tasks_dir.mkdir(mode=0o711, parents=True)
        os.chmod(self.tasks_dir, 0o711)

    def ready_count(self, runtime: str) -> int:
        return sum(1 for pooled in self._pooled.get(runtime, []) if pooled.ready)

    def count(self, runtime: str) -> int:
        """Pooled sandboxes of the runtime, ready or still starting."""
        return len(self._pooled.get(runtime, []))

    # Taking a pre-started sandbox.

    async def start_instance(self, spec: InstanceSpec, *, provisioned: bool) -> StartResult | None:
        """Start an instance of ``spec`` in a pre-started sandbox; None when none can take it.

        None leaves the start to the worker's fresh path, which also answers for a lack of
        memory. Once the runtime has its assignment, the outcome is the instance's, init
        failures included, as for a fresh start.
        """
        if not self._can_serve(spec) or not self.count(spec.runtime):
            return None
        if spec.memory_mb > self.worker.free_mb or self.worker.draining:
            return None
        # Reserved before the code is fetched, as a fresh start does, so that no concurrent
        # start counts on this memory meanwhile.
        self.worker._reserve(spec.memory_mb)
        try:
            code_dir = await self.worker._code_path(spec.code_sha256)
        except BaseException:
            self.worker._reserve(-spec.memory_mb)
            raise
        pooled = self._take(spec.runtime) if not self.worker.draining else None
        if pooled is None:
            self.worker._reserve(-spec.memory_mb)
            return None

        self._assigning += 1
        try:
            return await self._assign(pooled, spec, code_dir, provisioned=provisioned)
        finally:
            self._assigning -= 1
            self._settled_at = time.monotonic() + REFILL_SETTLE_S
            self._wake.set()  # an empty runtime refills now, the others once settled
            asyncio.get_running_loop().call_later(REFILL_SETTLE_S, self._wake.set)

    async def _assign(
        self, pooled: PooledSandbox, spec: InstanceSpec, code_dir: Path, *, provisioned: bool
    ) -> StartResult | None:
        worker = self.worker
        # The instance's init starts now, even if the sandbox is still starting: that is part
        # of what the caller waits for.
        init_started_ns = time.perf_counter_ns()
        if not pooled.ready:
            try:
                launched = await self._wait_launched(pooled)
            except asyncio.CancelledError:
                worker._reserve(-spec.memory_mb)
                raise
            if not launched:
                worker._reserve(-spec.memory_mb)
                return None

        assert pooled.sandbox is not None
        environment = ExecutionEnvironment(
            pooled.instance_id,
            spec,
            pooled.sandbox,
            pooled.api,
            log_max_bytes=worker.config.log_max_bytes,
            on_stopped=self._instance_stopped,
            init_started_ns=init_started_ns,
        )
        worker.environments[pooled.instance_id] = environment
        try:
            await self.make_room()
            await asyncio.to_thread(link_tree, code_dir, self.tasks_dir / pooled.instance_id)
            await pooled.sandbox.resize(spec.memory_mb)
        except Exception as exc:  # noqa: BLE001 - a fresh start still serves the request
            log.warning(
                "could not hand a pre-started sandbox to a function",
                instance_id=pooled.instance_id,
                function=spec.function_name,
                error=repr(exc),
            )
            await environment.stop()
            return None
        env = worker._environment(spec, pooled.instance_id, provisioned)
        if not pooled.api.assign(env):
            log.info(
                "pre-started sandbox gone before its assignment",
                instance_id=pooled.instance_id,
                function=spec.function_name,
            )
            await environment.stop()
            return None

        log.debug(
            "instance starting in a pre-started sandbox",
            instance_id=pooled.instance_id,
            function=spec.function_name,
        )
        start = await environment.initialize(worker.config.init_timeout_s)
        return replace(start, prestarted=True)

    def _can_serve(self, spec: InstanceSpec) -> bool:
        if spec.package_type != "Zip" or spec.runtime not in self._pooled:
            return False
        prefixes, names = _INTERPRETER_ENV.get(spec.runtime, ((), frozenset()))
        return not any(key.startswith(prefixes) or key in names for key in spec.environment)

    def _take(self, runtime: str) -> PooledSandbox | None:
        """Remove a sandbox of the runtime from the pool: a ready one, else one starting.

        Ready ones that died without their watcher noticing yet are skipped and discarded.
        """
        for pooled in [p for p in self._pooled[runtime] if p.ready]:
            self._drop(pooled)
            if pooled.watcher is not None:
                pooled.watcher.cancel()
            if pooled.api.awaiting_assignment:
                assert pooled.sandbox is not None
                # Whatever it printed while waiting is not the function's.
                pooled.sandbox.drain_output()
                return pooled
            self._in_background(self._discard(pooled))

        starting = self._pooled[runtime]
        if not starting:
            return None
        pooled = starting[0]
        self._drop(pooled)
        pooled.taken = True
        pooled.launched = asyncio.get_running_loop().create_future()
        return pooled

    async def _wait_launched(self, pooled: PooledSandbox) -> bool:
        """Wait for a sandbox taken while starting; False if it did not come up."""
        assert pooled.launched is not None
        try:
            ready = await asyncio.shield(pooled.launched)
        except asyncio.CancelledError:
            # Nobody will use it now: stop it once its starter hands it over.
            def discard(launched: asyncio.Future[bool]) -> None:
                if launched.result():
                    self._in_background(self._discard(pooled))

            pooled.launched.add_done_callback(discard)
            raise
        if ready:
            assert pooled.sandbox is not None
            pooled.sandbox.drain_output()
        return ready

    def _instance_stopped(self, environment: ExecutionEnvironment) -> None:
        self.worker._forget(environment)
        self._in_background(
            asyncio.to_thread(
                shutil.rmtree, self.tasks_dir / environment.instance_id, ignore_errors=True
            )
        )

    # Memory.

    async def make_room(self) -> None:
        """Stop pooled sandboxes until the worker's instances and the pool fit its memory."""
        released: list[PooledSandbox] = []
        while self._over_mb() > 0 and (pooled := self._victim()) is not None:
            self._drop(pooled)
            pooled.released = True
            if pooled.ready:
                released.append(pooled)
        if released:
            log.info("pre-started sandboxes stopped to make room", count=len(released))
            outcomes = await asyncio.gather(
                *(self._discard(pooled) for pooled in released), return_exceptions=True
            )
            for pooled, outcome in zip(released, outcomes, strict=True):
                if isinstance(outcome, Exception):
                    log.warning(
                        "stopping a pre-started sandbox failed",
                        instance_id=pooled.instance_id,
                        error=repr(outcome),
                    )

    def _over_mb(self) -> int:
        return self.worker.reserved_mb + self.reserved_mb - self.worker.config.memory_mb

    def _victim(self) -> PooledSandbox | None:
        """One still starting if any (it serves nobody yet), from the fullest runtime."""
        candidates = [pooled for entries in self._pooled.values() for pooled in entries]
        if not candidates:
            return None
        counts = {runtime: len(entries) for runtime, entries in self._pooled.items()}
        return max(candidates, key=lambda p: (not p.ready, counts[p.runtime]))

    def _room_mb(self) -> int:
        return -self._over_mb()

    def _drop(self, pooled: PooledSandbox) -> None:
        entries = self._pooled[pooled.runtime]
        if pooled in entries:
            entries.remove(pooled)
            self.reserved_mb -= POOL_MEMORY_MB

    # Filling.

    async def _keep_filled(self) -> None:
        while not self._closed:
            self._wake.clear()
            try:
                await self._fill()
            except Exception:  # noqa: BLE001 - the pool must outlive one bad round
                log.exception("filling the pre-started sandbox pool failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=REFILL_CHECK_S)

    async def _fill(self) -> None:
        while (runtime := self._next_runtime()) is not None:
            await self._prestart(runtime)

    def _next_runtime(self) -> str | None:
        """The runtime with the fewest pooled sandboxes below the size, if memory allows one."""
        if self._closed or self.worker.draining or self._room_mb() < POOL_MEMORY_MB:
            return None
        now = time.monotonic()
        target = 1 if self._assigning or now < self._settled_at else self.size
        wanting = [
            runtime
            for runtime in self.runtimes
            if len(self._pooled[runtime]) < target and self._retry_at.get(runtime, 0) <= now
        ]
        return min(wanting, key=lambda r: len(self._pooled[r]), default=None)

    async def _prestart(self, runtime: str) -> None:
        instance_id = uuid.uuid4().hex
        api_dir = self.worker.instances_dir / instance_id
        pooled = PooledSandbox(
            instance_id, runtime, RuntimeApiServer(api_dir / "runtime.sock", prestarted=True)
        )
        self._pooled[runtime].append(pooled)
        self.reserved_mb += POOL_MEMORY_MB

        try:
            ready = await self._launch(pooled, api_dir)
        except asyncio.CancelledError:
            # Only close() cancels, when a start hangs; a start waiting for it must not hang too.
            if pooled.launched is not None and not pooled.launched.done():
                pooled.launched.set_result(False)
            self._drop(pooled)
            await self._discard(pooled)
            raise
        except Exception as exc:  # noqa: BLE001 - logged; the runtime is retried later
            log.warning(
                "could not pre-start a sandbox", runtime=runtime, error=repr(exc), exc_info=True
            )
            ready = False
        if not ready:
            self._retry_at[runtime] = time.monotonic() + RETRY_AFTER_FAILURE_S
        if pooled.taken:
            # A start waits for this very sandbox; from here on it is that start's.
            assert pooled.launched is not None
            if not ready:
                await self._discard(pooled)
            pooled.launched.set_result(ready)
            return
        if not ready or pooled.released or self._closed:
            self._drop(pooled)
            await self._discard(pooled)
            return

        pooled.ready = True
        pooled.watcher = asyncio.create_task(self._watch(pooled))
        log.debug("sandbox pre-started", instance_id=instance_id, runtime=runtime)

    async def _launch(self, pooled: PooledSandbox, api_dir: Path) -> bool:
        """Start the sandbox and wait for its runtime to ask for an assignment."""
        worker = self.worker
        task_dir = self.tasks_dir / pooled.instance_id
        api_dir.mkdir(mode=0o755)
        task_dir.mkdir(mode=0o755)
        os.chmod(task_dir, 0o755)
        await pooled.api.start()
        spec = SandboxSpec(
            instance_id=pooled.instance_id,
            command=worker._command(pooled.runtime),
            env={**worker._base_environment(), "LAMBENT_PRESTARTED": "1"},
            code_dir=task_dir,
            runtime_dir=worker.runtime_dir,
            api_dir=api_dir,
            memory_mb=POOL_MEMORY_MB,
            tmp_mb=worker.config.tmp_mb,
            pids_max=worker.config.pids_max,
            labels={"lambent.instance": pooled.instance_id, "lambent.prestarted": pooled.runtime},
            runtime=pooled.runtime,
        )
        sandbox = pooled.sandbox = await worker.backend.start(spec)
        sandbox.set_output_handler(
            lambda chunk: log.debug(
                "pre-started sandbox output", instance_id=pooled.instance_id, output=chunk[:200]
            )
        )

        polled = asyncio.ensure_future(pooled.api.wait_for_assignment_poll())
        exited = asyncio.ensure_future(sandbox.wait())
        try:
            await asyncio.wait(
                (polled, exited),
                timeout=worker.config.init_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            polled.cancel()
            exited.cancel()
        if exited.done() and not exited.cancelled():
            log.warning(
                "pre-started sandbox exited before it was ready",
                instance_id=pooled.instance_id,
                runtime=pooled.runtime,
                exit_status=exited.result(),
            )
            return False
        if not polled.done() or polled.cancelled():
            log.warning(
                "pre-started sandbox not ready in time",
                instance_id=pooled.instance_id,
                runtime=pooled.runtime,
                init_timeout_s=worker.config.init_timeout_s,
            )
            return False
        return True

    async def _watch(self, pooled: PooledSandbox) -> None:
        assert pooled.sandbox is not None
        exit_status = await pooled.sandbox.wait()
        log.warning(
            "pre-started sandbox exited while waiting; replacing it",
            instance_id=pooled.instance_id,
            runtime=pooled.runtime,
            exit_status=exit_status,
        )
        self._drop(pooled)
        pooled.watcher = None
        await self._discard(pooled)
        self._wake.set()

    async def _discard(self, pooled: PooledSandbox) -> None:
        """Stop a sandbox that was never assigned and remove its files."""
        if pooled.watcher is not None and pooled.watcher is not asyncio.current_task():
            pooled.watcher.cancel()
        try:
            if pooled.sandbox is not None:
                await pooled.sandbox.destroy()
            await pooled.api.stop()
        finally:
            await asyncio.to_thread(self._remove_dirs, pooled.instance_id)

    def _remove_dirs(self, instance_id: str) -> None:
        shutil.rmtree(self.worker.instances_dir / instance_id, ignore_errors=True)
        shutil.rmtree(self.tasks_dir / instance_id, ignore_errors=True)

    def _in_background(self, job: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Stop every pooled sandbox and remove what they left."""
        self._closed = True
        self._wake.set()
        if self._filler is not None:
            # A sandbox being started is let finish, so that it is stopped like the others.
            timeout_s = self.worker.config.init_timeout_s + 5
            done, _ = await asyncio.wait({self._filler}, timeout=timeout_s)
            if not done:
                self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._filler
        pooled = [p for entries in self._pooled.values() for p in entries]
        for p in pooled:
            self._drop(p)
            p.released = True
        await asyncio.gather(*(self._discard(p) for p in pooled), return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)


def link_tree(source: Path, dest: Path) -> None:
    """Fill the existing ``dest`` with ``source``'s tree without copying file contents.

    Directories are made with their modes, files hard-linked, symlinks recreated. Across
    filesystems, where hard links cannot reach, files are copied instead.
    """
    directories: list[tuple[str, int]] = []
    stack = [(str(source), str(dest))]
    while stack:
        source_dir, dest_dir = stack.pop()
        with os.scandir(source_dir) as entries:
            for entry in entries:
                target = os.path.join(dest_dir, entry.name)
                if entry.is_symlink():
                    os.symlink(os.readlink(entry.path), target)
                elif entry.is_dir():
                    os.mkdir(target)
                    directories.append((target, stat.S_IMODE(entry.stat().st_mode)))
                    stack.append((entry.path, target))
                else:
                    try:
                        os.link(entry.path, target)
                    except OSError as exc:
                        if exc.errno != errno.EXDEV:
                            raise
                        shutil.copy2(entry.path, target)
    # Modes last: a directory without write permission could not have been filled.
    for path, mode in directories:
        os.chmod(path, mode)
