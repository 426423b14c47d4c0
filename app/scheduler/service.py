"""Placement, warm pools and concurrency: which execution environment serves an invocation.

Idle instances are kept per function revision and reused most recently used first, so a steady
load keeps as few instances warm as it needs and the rest age out after the keep-alive. A new
instance goes to the worker with the most free memory; when no worker has room, this scheduler's
idle instances are stopped, least recently used first; then a worker whose own idle instances
(another API process's) would make room is asked, and it stops them itself; failing that the
request waits, bounded, for memory to free up.

A scheduler stops only the instances it started: with several API processes, another's are
not its to stop. Workers stop the idle instances that no API process looks after any more
(workers/agent.py), so this scheduler tells them which ones it keeps for provisioned concurrency.

Concurrency follows Lambda: a function with reserved concurrency R runs at most R invocations at
once (R = 0 throttles it), and the tenant's other functions share what is left of the tenant's
limit. The limits hold across every live API process (app/scheduler/ledger.py): counted in
memory while this is the only one, in the database while there are others. Provisioned
concurrency is divided among the live API processes, each keeping its share of the instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.errors import ServiceUnavailable, TooManyRequests
from app.logging import get_logger
from app.scheduler.ledger import ConcurrencyLedger, Slot, SlotState
from workers.client import WorkerClient
from workers.protocol import (
    InstanceGone,
    InstanceSpec,
    InstanceStatus,
    InvokeRequest,
    InvokeResult,
    NoRoom,
    StartResult,
    WorkerUnavailable,
    WorkerUnreachable,
)

if TYPE_CHECKING:
    from app.scheduler.processes import ApiProcessRegistry

log = get_logger(__name__)

PoolKey = tuple[str, int]  # (function id, revision)
RETRY_AFTER_S = 1


class Throttled(TooManyRequests):
    """An invocation over a concurrency limit."""


class NoCapacity(ServiceUnavailable):
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)}


class RoomTaken(NoCapacity):
    """The worker chosen for a new instance had no room after all: another start took it."""


@dataclass(frozen=True)
class ConcurrencyLimits:
    tenant_limit: int
    reserved: int | None = None  # this function's reservation, if any
    tenant_reserved_total: int = 0  # all reservations of the tenant's functions

    @property
    def unreserved(self) -> int:
        """What the tenant's functions without a reservation share."""
        return max(0, self.tenant_limit - self.tenant_reserved_total)

    def applying(self) -> tuple[bool, int]:
        """Whether the function's reservation is what limits it, and the limit that applies."""
        if self.reserved is not None:
            return True, self.reserved
        return False, self.unreserved


@dataclass(frozen=True)
class Peers:
    """The live API processes as this one last saw them, itself included."""

    index: int = 0  # this process's place among them, ordered by id
    count: int = 1
    # Provisioned instances the others have ready, per function id.
    provisioned_ready: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class Lease:
    """The scheduler's view of one live instance."""

    instance_id: str
    worker: WorkerClient
    spec: InstanceSpec
    state: InstanceStatus = InstanceStatus.STARTING
    provisioned: bool = False
    started_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    invocations: int = 0

    @property
    def key(self) -> PoolKey:
        return (self.spec.function_id, self.spec.revision)


@dataclass(frozen=True)
class Scheduled:
    """What the scheduler did for one invocation."""

    instance_id: str
    worker_id: str
    cold_start: bool
    start: StartResult | None
    result: InvokeResult | None  # None when the instance failed to initialise
    queue_wait_s: float = 0.0


class Scheduler:
    def __init__(
        self,
        workers: list[WorkerClient],
        *,
        keepalive_s: float,
        capacity_wait_s: float = 10.0,
        provisioned_check_s: float = 1.0,
    ) -> None:
        self.workers = list(workers)
        self.keepalive_s = keepalive_s
        self.capacity_wait_s = capacity_wait_s
        self.provisioned_check_s = provisioned_check_s
        self.live: dict[str, Lease] = {}
        self._idle: dict[PoolKey, list[Lease]] = {}
        self._current_revision: dict[str, int] = {}
        self.ledger = ConcurrencyLedger()
        self.peers = Peers()
        # The registry of API processes that keeps ledger and peers up to date, once started.
        self.processes: ApiProcessRegistry | None = None
        self._provisioned: dict[str, tuple[InstanceSpec, int]] = {}
        self._provisioning: dict[str, asyncio.Task[None]] = {}
        self._freed = asyncio.Condition()
        self._waiting_for_freed = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.on_throttle: Callable[[InstanceSpec, str], None] | None = None

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._every(self._reap_interval(), self.reap_idle)),
            asyncio.create_task(self._every(self._reap_interval(), self.keep_provisioned)),
            asyncio.create_task(self._every(self.provisioned_check_s, self.ensure_provisioned)),
        ]

    def _reap_interval(self) -> float:
        return min(max(self.keepalive_s / 10, 0.5), 30)

    async def close(self) -> None:
        for task in [*self._tasks, *self._provisioning.values()]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for lease in list(self.live.values()):
            await self._stop(lease)

    # Workers come and go.

    def add_worker(self, worker: WorkerClient) -> None:
        """Place new instances on this worker too (replacing one with the same id)."""
        self.remove_worker(worker.worker_id)
        self.workers.append(worker)

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker and every instance on it; calls in flight to it fail on their own."""
        self.workers = [w for w in self.workers if w.worker_id != worker_id]
        for lease in [x for x in self.live.values() if x.worker.worker_id == worker_id]:
            self._forget(lease)

    # Concurrency.

    def _admit(self, spec: InstanceSpec, limits: ConcurrencyLimits) -> Slot:
        """Take a concurrency slot for one invocation, or raise Throttled.

        Counted in this process alone; _admit_shared counts every live API process's.
        """
        reserved, limit = limits.applying()
        slot = self.ledger.admit(spec.tenant_id, spec.function_id, reserved, limit)
        if slot is None:
            raise self._throttle(spec, limits)
        return slot

    async def _admit_shared(self, spec: InstanceSpec, limits: ConcurrencyLimits) -> Slot:
        reserved, limit = limits.applying()
        slot = await self.ledger.admit_shared(spec.tenant_id, spec.function_id, reserved, limit)
        if slot is None:
            raise self._throttle(spec, limits)
        return slot

    def _throttle(self, spec: InstanceSpec, limits: ConcurrencyLimits) -> Throttled:
        if limits.reserved is not None:
            self._throttled(spec, "reserved")
            return Throttled(
                f"function {spec.function_name!r} is at its reserved concurrency "
                f"({limits.reserved})",
                retry_after_s=RETRY_AFTER_S,
            )
        self._throttled(spec, "tenant")
        return Throttled(
            f"the tenant's functions without reserved concurrency are at their limit "
            f"({limits.unreserved} of the tenant's {limits.tenant_limit})",
            retry_after_s=RETRY_AFTER_S,
        )

    def _throttled(self, spec: InstanceSpec, reason: str) -> None:
        if self.on_throttle is not None:
            self.on_throttle(spec, reason)

    def inflight(self, function_id: str) -> int:
        """This process's invocations of the function in flight."""
        return self.ledger.function[function_id]

    # The invoke path.

    async def invoke(
        self, spec: InstanceSpec, request: InvokeRequest, limits: ConcurrencyLimits
    ) -> Scheduled:
        ledger = self.ledger
        if ledger.shared:
            slot = await self._admit_shared(spec, limits)
        else:
            # The only live API process: the counters in memory are the whole count.
            slot = self._admit(spec, limits)
        try:
            return await self._invoke(spec, request)
        finally:
            if slot.state is SlotState.LOCAL:
                ledger.release(slot)
            else:
                await ledger.release_leased(slot)

    async def _invoke(self, spec: InstanceSpec, request: InvokeRequest) -> Scheduled:
        self._note_revision(spec)
        key = (spec.function_id, spec.revision)
        waited_from = time.monotonic()
        deadline = waited_from + self.capacity_wait_s

        while True:
            # An idle instance may have died since it was pooled, or its worker may be
            # unreachable; then try the next one.
            while (lease := self._take_idle(key)) is not None:
                try:
                    result = await self._run(lease, request)
                except (InstanceGone, WorkerUnreachable):
                    self._forget(lease)
                    continue
                return Scheduled(
                    lease.instance_id,
                    lease.worker.worker_id,
                    False,
                    None,
                    result,
                    time.monotonic() - waited_from,
                )
            if await self._find_room(spec.memory_mb, self._unsuited(spec)) is None:
                # No room anywhere: wait for an instance to finish (it may be one of ours, which
                # then serves this request warm) or for memory to free up.
                await self._wait_for_freed(deadline, spec.memory_mb)
                continue
            try:
                lease, start = await self._start(spec)
            except RoomTaken:
                continue  # so wait as above: what took the room may serve this request warm
            break

        queue_wait_s = max(0.0, time.monotonic() - waited_from - start.init_duration_ns / 1e9)
        if lease is None:
            return Scheduled(start.instance_id, "", True, start, None, queue_wait_s)
        lease.state = InstanceStatus.BUSY
        try:
            result = await self._run(lease, request)
        except InstanceGone as gone:
            self._forget(lease)
            raise ServiceUnavailable(
                f"the new instance stopped before it could be invoked: {gone}"
            ) from gone
        return Scheduled(
            lease.instance_id, lease.worker.worker_id, True, start, result, queue_wait_s
        )

    async def _run(self, lease: Lease, request: InvokeRequest) -> InvokeResult:
        lease.state = InstanceStatus.BUSY
        try:
            result = await lease.worker.invoke(lease.instance_id, request)
        except WorkerUnavailable:
            self._forget(lease)
            await self._notify_freed()
            raise
        lease.invocations += 1
        lease.last_used_at = time.time()
        lease.last_used = time.monotonic()
        await self._release(lease, result)
        return result

    def _note_revision(self, spec: InstanceSpec) -> None:
        if self._current_revision.get(spec.function_id, -1) < spec.revision:
            self._current_revision[spec.function_id] = spec.revision

    def _take_idle(self, key: PoolKey) -> Lease | None:
        leases = self._idle.get(key)
        if not leases:
            return None
        lease = leases.pop()
        if not leases:
            del self._idle[key]
        return lease

    def _pool(self, lease: Lease) -> None:
        lease.state = InstanceStatus.IDLE
        self._idle.setdefault(lease.key, []).append(lease)

    async def _release(self, lease: Lease, result: InvokeResult) -> None:
        current = self._current_revision.get(lease.spec.function_id)
        if not result.instance_alive or self.live.get(lease.instance_id) is not lease:
            # Dead, or forgotten while it ran (its worker left the pool).
            self._forget(lease)
        elif current == lease.spec.revision:
            self._pool(lease)
        else:
            await self._stop(lease)
        await self._notify_freed()

    async def _start(
        self, spec: InstanceSpec, *, provisioned: bool = False
    ) -> tuple[Lease | None, StartResult]:
        tried = self._unsuited(spec)
        while True:
            worker = await self._place(spec.memory_mb, exclude=tried)
            try:
                start = await worker.start_instance(spec, provisioned=provisioned)
                break
            except (WorkerUnavailable, NoRoom) as exc:
                # Nothing ran yet, so another worker may safely take it.
                log.warning(
                    "worker could not start an instance", worker=worker.worker_id, reason=str(exc)
                )
                if isinstance(exc, NoRoom) and not self._could_take(worker, spec.memory_mb):
                    # Its refusal brought our view of it up to date: a concurrent start took
                    # the room since this one was placed.
                    raise RoomTaken(str(exc)) from exc
                tried.add(worker.worker_id)
        if start.init_error_type is not None:
            await self._notify_freed()
            return None, start
        lease = Lease(start.instance_id, worker, spec, provisioned=provisioned)
        lease.state = InstanceStatus.IDLE
        self.live[lease.instance_id] = lease
        return lease, start

    def _unsuited(self, spec: InstanceSpec) -> set[str]:
        """Workers that cannot run the function at all: a container image needs Docker."""
        if spec.package_type != "Image":
            return set()
        return {w.worker_id for w in self.workers if getattr(w, "sandbox", None) != "docker"}

    async def _find_room(self, memory_mb: int, exclude: set[str]) -> WorkerClient | None:
        """A worker that can take an instance of ``memory_mb`` now, making room if need be."""
        worker = self._roomiest(memory_mb, exclude)
        if worker is None and await self._evict_for(memory_mb, exclude):
            worker = self._roomiest(memory_mb, exclude)
        return worker or self._reclaiming(memory_mb, exclude)

    async def _wait_for_freed(self, deadline: float, memory_mb: int) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NoCapacity(
                f"no worker has {memory_mb} MB free for a new instance; retry later "
                "(operators: add workers or raise LAMBENT_WORKER_MEMORY_MB)"
            )
        self._waiting_for_freed += 1
        try:
            async with self._freed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), timeout=remaining)
        finally:
            self._waiting_for_freed -= 1

    async def _place(self, memory_mb: int, *, exclude: set[str]) -> WorkerClient:
        deadline = time.monotonic() + self.capacity_wait_s
        while True:
            worker = await self._find_room(memory_mb, exclude)
            if worker is not None:
                return worker
            await self._wait_for_freed(deadline, memory_mb)

    def _roomiest(self, memory_mb: int, exclude: set[str]) -> WorkerClient | None:
        candidates = [
            w
            for w in self.workers
            if w.free_mb >= memory_mb and w.worker_id not in exclude and w.healthy
        ]
        return max(candidates, key=lambda w: w.free_mb, default=None)

    def _could_take(self, worker: WorkerClient, memory_mb: int) -> bool:
        return worker.free_mb + worker.idle_mb >= memory_mb

    def _reclaiming(self, memory_mb: int, exclude: set[str]) -> WorkerClient | None:
        """The worker with the most room once it stops idle instances itself (any of ours
        that could go are stopped already; the rest are other API processes')."""
        candidates = [
            w
            for w in self.workers
            if self._could_take(w, memory_mb) and w.worker_id not in exclude and w.healthy
        ]
        return max(candidates, key=lambda w: w.free_mb + w.idle_mb, default=None)

    async def _evict_for(self, memory_mb: int, exclude: set[str]) -> bool:
        """Stop idle instances, least recently used first, until some worker has room."""
        idle = sorted(
            (lease for leases in self._idle.values() for lease in leases if not lease.provisioned),
            key=lambda lease: lease.last_used,
        )
        for lease in idle:
            if self._roomiest(memory_mb, exclude) is not None:
                return True
            log.info("evicting idle instance for memory", instance_id=lease.instance_id)
            await self._stop(lease)
        return self._roomiest(memory_mb, exclude) is not None

    def _forget(self, lease: Lease) -> None:
        self.live.pop(lease.instance_id, None)
        leases = self._idle.get(lease.key)
        if leases is not None:
            with contextlib.suppress(ValueError):
                leases.remove(lease)
            if not leases:
                self._idle.pop(lease.key, None)

    async def _stop(self, lease: Lease) -> None:
        self._forget(lease)
        try:
            await lease.worker.stop_instance(lease.instance_id)
        except Exception:  # noqa: BLE001 - a failed stop must not fail the caller's request
            log.warning("stopping an instance failed", instance_id=lease.instance_id)
        await self._notify_freed()

    async def _notify_freed(self) -> None:
        if not self._waiting_for_freed:
            return  # the common case, on every invocation's end: nobody to wake
        async with self._freed:
            self._freed.notify_all()

    # Changes of code and configuration.

    async def retire(self, function_id: str, revision: int | None = None) -> None:
        """Stop the idle instances of a function's older revisions (all, when deleted).

        Busy ones stop when they finish; provisioned concurrency moves to the new revision.
        """
        self._current_revision[function_id] = -1 if revision is None else revision
        if revision is None:
            self._provisioned.pop(function_id, None)
        stale = [
            lease
            for lease in self.live.values()
            if lease.spec.function_id == function_id
            and lease.spec.revision != revision
            and lease.state is InstanceStatus.IDLE
        ]
        for lease in stale:
            await self._stop(lease)

    # Provisioned concurrency.

    def set_provisioned(self, spec: InstanceSpec, count: int) -> None:
        """Keep ``count`` initialised instances of this function revision (0 to stop)."""
        self._note_revision(spec)
        if count <= 0:
            self._provisioned.pop(spec.function_id, None)
            for lease in self.live.values():
                if lease.spec.function_id == spec.function_id:
                    # They stay warm like any instance and age out with the keep-alive.
                    lease.provisioned = False
            return
        self._provisioned[spec.function_id] = (spec, count)

    def provisioned_settings(self) -> dict[str, tuple[InstanceSpec, int]]:
        """Every function's provisioned concurrency as this process knows it, in total."""
        return dict(self._provisioned)

    def provisioned_share(self, function_id: str, count: int) -> int:
        """The instances of ``count`` that this API process keeps; the live ones' add up to it.

        Each keeps count // P, and count % P of them one more. Which ones turns with the
        function, so that many functions of one instance each spread over the processes.
        """
        peers = self.peers
        if peers.count <= 1:
            return count
        place = (peers.index - zlib.crc32(function_id.encode())) % peers.count
        return count // peers.count + (1 if place < count % peers.count else 0)

    def provisioned_ready(self, function_id: str) -> int:
        """Provisioned instances ready in every live API process, as of their last heartbeat."""
        elsewhere = self.peers.provisioned_ready.get(function_id, 0)
        return self.provisioned_ready_here(function_id) + elsewhere

    def provisioned_ready_here(self, function_id: str) -> int:
        revision = self._current_revision.get(function_id)
        return sum(
            1
            for lease in self.live.values()
            if lease.provisioned
            and lease.spec.function_id == function_id
            and lease.spec.revision == revision
        )

    async def ensure_provisioned(self) -> None:
        """Start what this process's share of provisioned concurrency is missing; release what
        is over."""
        for function_id, (spec, configured) in list(self._provisioned.items()):
            count = self.provisioned_share(function_id, configured)
            mine = [
                lease
                for lease in self.live.values()
                if lease.provisioned and lease.spec.function_id == function_id
            ]
            for lease in mine:
                if lease.spec.revision != spec.revision:
                    lease.provisioned = False
            current = [lease for lease in mine if lease.spec.revision == spec.revision]
            for lease in current[count:]:
                lease.provisioned = False
            # Warm idle instances of the revision count towards it before new ones start.
            missing = count - min(len(current), count)
            for lease in self._idle.get((function_id, spec.revision), []):
                if missing <= 0:
                    break
                if not lease.provisioned:
                    lease.provisioned = True
                    missing -= 1
            task = self._provisioning.get(function_id)
            if missing > 0 and (task is None or task.done()):
                self._provisioning[function_id] = asyncio.create_task(
                    self._provision(spec, missing)
                )

    async def _provision(self, spec: InstanceSpec, missing: int) -> None:
        for _ in range(missing):
            if self._provisioned.get(spec.function_id, (None, 0))[0] != spec:
                return
            try:
                lease, start = await self._start(spec, provisioned=True)
            except ServiceUnavailable as exc:
                log.warning(
                    "cannot start provisioned instance",
                    function=spec.function_name,
                    reason=exc.message,
                )
                return
            if lease is None:
                log.warning(
                    "provisioned instance failed to initialise",
                    function=spec.function_name,
                    error_type=start.init_error_type,
                )
                return
            self._pool(lease)
        await self._notify_freed()

    async def keep_provisioned(self) -> None:
        """Tell each worker which of its instances are kept for provisioned concurrency.

        The worker then does not stop them as abandoned or for room. One that is gone (its
        worker stopped it anyway) is forgotten, so that ensure_provisioned replaces it.
        """
        kept: dict[str, list[Lease]] = {}
        for lease in self.live.values():
            if lease.provisioned:
                kept.setdefault(lease.worker.worker_id, []).append(lease)
        for leases in kept.values():
            worker = leases[0].worker
            try:
                gone = set(await worker.keep_instances([lease.instance_id for lease in leases]))
            except WorkerUnavailable:
                continue  # its heartbeats tell whether it is gone
            except Exception as exc:  # noqa: BLE001 - the other workers are still told
                log.warning(
                    "cannot tell a worker which instances are kept",
                    worker_id=worker.worker_id,
                    error=repr(exc),
                )
                continue
            for lease in leases:
                if lease.instance_id in gone and self.live.get(lease.instance_id) is lease:
                    log.warning(
                        "a provisioned instance is gone from its worker",
                        instance_id=lease.instance_id,
                        worker_id=worker.worker_id,
                        function=lease.spec.function_name,
                    )
                    self._forget(lease)

    # Keep-alive.

    async def reap_idle(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        expired = [
            lease
            for leases in self._idle.values()
            for lease in leases
            if not lease.provisioned and now - lease.last_used >= self.keepalive_s
        ]
        for lease in expired:
            log.debug("instance kept idle too long", instance_id=lease.instance_id)
            await self._stop(lease)
        return len(expired)

    async def _every(self, interval_s: float, job: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await job()  # type: ignore[misc]
            except Exception:  # noqa: BLE001 - a periodic job must outlive one bad round
                log.exception("scheduler job failed", job=getattr(job, "__name__", str(job)))

    # Visibility.

    def instances_of(self, function_id: str) -> list[Lease]:
        return sorted(
            (lease for lease in self.live.values() if lease.spec.function_id == function_id),
            key=lambda lease: lease.started_at,
        )

    def idle_count(self) -> int:
        return sum(len(leases) for leases in self._idle.values())
