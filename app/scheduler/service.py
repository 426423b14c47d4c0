"""Placement and warm pools: which execution environment serves an invocation.

Idle instances are kept per function revision and reused most-recently-used first, so a
steady load keeps as few instances warm as it needs and the rest age out after the keep-alive.
A new instance goes to the worker with the most free memory; when no worker has room, idle
instances of other functions are stopped, least recently used first, and failing that the
request waits, bounded, for memory to free up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from app.errors import ServiceUnavailable
from app.logging import get_logger
from workers.client import WorkerClient
from workers.protocol import InstanceGone, InstanceSpec, InvokeRequest, InvokeResult, StartResult

log = get_logger(__name__)

PoolKey = tuple[str, int]  # (function id, revision)


@dataclass
class Lease:
    instance_id: str
    worker: WorkerClient
    key: PoolKey
    memory_mb: int
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Scheduled:
    """What the scheduler did for one invocation."""

    instance_id: str
    cold_start: bool
    start: StartResult | None
    result: InvokeResult | None  # None when the instance failed to initialise


class Scheduler:
    def __init__(
        self,
        workers: list[WorkerClient],
        *,
        keepalive_s: float,
        capacity_wait_s: float = 10.0,
    ) -> None:
        self.workers = workers
        self.keepalive_s = keepalive_s
        self.capacity_wait_s = capacity_wait_s
        self._idle: dict[PoolKey, list[Lease]] = {}
        self._current_revision: dict[str, int] = {}
        self._freed = asyncio.Condition()
        self._reaper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_forever())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for leases in list(self._idle.values()):
            for lease in leases:
                await self._stop(lease)
        self._idle.clear()

    async def invoke(self, spec: InstanceSpec, request: InvokeRequest) -> Scheduled:
        key = (spec.function_id, spec.revision)
        self._current_revision[spec.function_id] = spec.revision

        # An idle instance may have died since it was pooled; then try the next one, and
        # finally start a new one.
        while (lease := self._take_idle(key)) is not None:
            try:
                result = await lease.worker.invoke(lease.instance_id, request)
            except InstanceGone:
                continue
            await self._release(lease, result)
            return Scheduled(lease.instance_id, False, None, result)

        lease, start = await self._start(spec)
        if lease is None:
            return Scheduled(start.instance_id, True, start, None)
        try:
            result = await lease.worker.invoke(lease.instance_id, request)
        except InstanceGone as gone:
            # It initialised and died before its first event: report it as a crash.
            await self._notify_freed()
            raise ServiceUnavailable(
                f"the new instance stopped before it could be invoked: {gone}"
            ) from gone
        await self._release(lease, result)
        return Scheduled(lease.instance_id, True, start, result)

    def _take_idle(self, key: PoolKey) -> Lease | None:
        leases = self._idle.get(key)
        if not leases:
            return None
        lease = leases.pop()
        if not leases:
            del self._idle[key]
        return lease

    async def _release(self, lease: Lease, result: InvokeResult) -> None:
        current = self._current_revision.get(lease.key[0])
        if result.instance_alive and current == lease.key[1]:
            lease.last_used = time.monotonic()
            self._idle.setdefault(lease.key, []).append(lease)
        elif result.instance_alive:
            await self._stop(lease)
        await self._notify_freed()

    async def _start(self, spec: InstanceSpec) -> tuple[Lease | None, StartResult]:
        worker = await self._place(spec.memory_mb)
        start = await worker.start_instance(spec)
        if start.init_error_type is not None:
            await self._notify_freed()
            return None, start
        lease = Lease(start.instance_id, worker, (spec.function_id, spec.revision), spec.memory_mb)
        return lease, start

    async def _place(self, memory_mb: int) -> WorkerClient:
        deadline = time.monotonic() + self.capacity_wait_s
        while True:
            worker = self._roomiest(memory_mb)
            if worker is not None:
                return worker
            if await self._evict_for(memory_mb):
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceUnavailable(
                    f"no worker has {memory_mb} MB free for a new instance; "
                    "retry later or raise LAMBENT_WORKER_MEMORY_MB"
                )
            async with self._freed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), timeout=remaining)

    def _roomiest(self, memory_mb: int) -> WorkerClient | None:
        candidates = [w for w in self.workers if w.free_mb >= memory_mb]
        return max(candidates, key=lambda w: w.free_mb, default=None)

    async def _evict_for(self, memory_mb: int) -> bool:
        """Stop idle instances, least recently used first, until some worker has room."""
        idle = sorted(
            (lease for leases in self._idle.values() for lease in leases),
            key=lambda lease: lease.last_used,
        )
        for lease in idle:
            if self._roomiest(memory_mb) is not None:
                return True
            self._remove_idle(lease)
            log.info("evicting idle instance for memory", instance_id=lease.instance_id)
            await self._stop(lease)
        return self._roomiest(memory_mb) is not None

    def _remove_idle(self, lease: Lease) -> None:
        leases = self._idle.get(lease.key, [])
        with contextlib.suppress(ValueError):
            leases.remove(lease)
        if not leases:
            self._idle.pop(lease.key, None)

    async def _stop(self, lease: Lease) -> None:
        try:
            await lease.worker.stop_instance(lease.instance_id)
        except Exception:  # noqa: BLE001 - a failed stop must not fail the caller's request
            log.exception("stopping an instance failed", instance_id=lease.instance_id)
        await self._notify_freed()

    async def _notify_freed(self) -> None:
        async with self._freed:
            self._freed.notify_all()

    async def retire(self, function_id: str, revision: int | None = None) -> None:
        """Stop the idle instances of a function; busy ones stop when they finish."""
        if revision is None:
            self._current_revision[function_id] = -1
        else:
            self._current_revision[function_id] = revision
        stale = [key for key in self._idle if key[0] == function_id and key[1] != revision]
        for key in stale:
            for lease in self._idle.pop(key):
                await self._stop(lease)

    async def reap_idle(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        expired = [
            lease
            for leases in self._idle.values()
            for lease in leases
            if now - lease.last_used >= self.keepalive_s
        ]
        for lease in expired:
            self._remove_idle(lease)
            log.debug("instance kept idle too long", instance_id=lease.instance_id)
            await self._stop(lease)
        return len(expired)

    async def _reap_forever(self) -> None:
        interval = min(max(self.keepalive_s / 10, 0.5), 30)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reap_idle()
            except Exception:  # noqa: BLE001 - the reaper must outlive one bad round
                log.exception("reaping idle instances failed")

    def idle_count(self) -> int:
        return sum(len(leases) for leases in self._idle.values())
