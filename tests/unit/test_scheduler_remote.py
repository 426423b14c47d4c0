"""How the scheduler treats workers that refuse, vanish or leave, through the WorkerClient seam.

``FakeWorker`` stands in for a remote worker: it refuses, fails to connect or holds an
invocation on demand, which real processes do only with luck in their timing.
"""

from __future__ import annotations

import asyncio
import uuid

from app.scheduler.service import ConcurrencyLimits, Scheduler
from workers.agent import InstanceInfo
from workers.protocol import (
    InstanceSpec,
    InvocationStatus,
    InvokeRequest,
    InvokeResult,
    NoRoom,
    StartResult,
    WorkerUnreachable,
)

SPEC = InstanceSpec(
    tenant_id="t",
    function_id="f",
    function_name="fn",
    revision=1,
    runtime="python3.11",
    handler="app.handler",
    memory_mb=128,
    timeout_s=3,
    code_sha256="0" * 64,
)
LIMITS = ConcurrencyLimits(tenant_limit=10)


class FakeWorker:
    def __init__(self, worker_id: str, capacity_mb: int = 1024) -> None:
        self.worker_id = worker_id
        self.capacity_mb = capacity_mb
        self.idle_mb = 0
        self.healthy = True
        self.refuse = False
        self.unreachable = False
        self.gate: asyncio.Event | None = None
        self.instance_ids: list[str] = []

    @property
    def free_mb(self) -> int:
        return self.capacity_mb - SPEC.memory_mb * len(self.instance_ids)

    async def start_instance(self, spec: InstanceSpec, *, provisioned: bool = False) -> StartResult:
        if self.refuse:
            raise NoRoom(f"{self.worker_id} is full")
        instance_id = uuid.uuid4().hex
        self.instance_ids.append(instance_id)
        return StartResult(instance_id, 1_000_000, "")

    async def invoke(self, instance_id: str, request: InvokeRequest) -> InvokeResult:
        if self.unreachable:
            raise WorkerUnreachable(f"cannot connect to {self.worker_id}")
        if self.gate is not None:
            await self.gate.wait()
        return InvokeResult(
            request.request_id, InvocationStatus.SUCCESS, b"{}", None, 1, 1, "", True
        )

    async def stop_instance(self, instance_id: str) -> None:
        self.instance_ids.remove(instance_id)

    async def keep_instances(self, instance_ids: list[str]) -> list[str]:
        return [i for i in instance_ids if i not in self.instance_ids]

    async def instances(self) -> list[InstanceInfo]:
        return []


def request() -> InvokeRequest:
    return InvokeRequest(str(uuid.uuid4()), b"{}", 3, "arn", "trace")


def test_a_worker_that_has_no_room_after_all_is_passed_over() -> None:
    roomy, refusing = FakeWorker("roomy", 1024), FakeWorker("refusing", 4096)
    refusing.refuse = True

    async def scenario() -> str:
        scheduler = Scheduler([roomy, refusing], keepalive_s=60)
        return (await scheduler.invoke(SPEC, request(), LIMITS)).worker_id

    assert asyncio.run(scenario()) == "roomy"


def test_a_warm_instance_on_an_unreachable_worker_is_skipped() -> None:
    first, second = FakeWorker("first", 4096), FakeWorker("second", 1024)

    async def scenario() -> tuple[str, str, int]:
        scheduler = Scheduler([first, second], keepalive_s=60)
        warm = await scheduler.invoke(SPEC, request(), LIMITS)
        first.unreachable = True
        first.healthy = False
        served = await scheduler.invoke(SPEC, request(), LIMITS)
        return warm.worker_id, served.worker_id, len(scheduler.live)

    warm_on, served_on, live = asyncio.run(scenario())

    assert (warm_on, served_on) == ("first", "second")
    assert live == 1  # the unreachable worker's instance was forgotten


def test_an_instance_whose_worker_left_mid_invocation_is_not_pooled_again() -> None:
    leaving = FakeWorker("leaving")

    async def scenario() -> tuple[InvocationStatus, int, int]:
        scheduler = Scheduler([leaving], keepalive_s=60)
        await scheduler.invoke(SPEC, request(), LIMITS)
        leaving.gate = asyncio.Event()
        running = asyncio.create_task(scheduler.invoke(SPEC, request(), LIMITS))
        await asyncio.sleep(0.01)
        scheduler.remove_worker("leaving")
        leaving.gate.set()
        result = (await running).result
        assert result is not None
        return result.status, len(scheduler.live), scheduler.idle_count()

    assert asyncio.run(scenario()) == (InvocationStatus.SUCCESS, 0, 0)


class ReclaimingWorker(FakeWorker):
    """Full of another API process's idle instances, which it stops when a start needs room."""

    async def start_instance(self, spec: InstanceSpec, *, provisioned: bool = False) -> StartResult:
        while self.free_mb < spec.memory_mb and self.idle_mb >= SPEC.memory_mb:
            self.instance_ids.pop(0)
            self.idle_mb -= SPEC.memory_mb
        return await super().start_instance(spec, provisioned=provisioned)


def test_a_worker_full_of_another_processs_idle_instances_is_asked_to_make_room() -> None:
    shared = ReclaimingWorker("shared", 256)
    shared.instance_ids = ["theirs-older", "theirs-newer"]
    shared.idle_mb = 256

    async def scenario() -> tuple[str, bool]:
        scheduler = Scheduler([shared], keepalive_s=60, capacity_wait_s=0.5)
        served = await scheduler.invoke(SPEC, request(), LIMITS)
        return served.worker_id, served.cold_start

    assert asyncio.run(scenario()) == ("shared", True)
    assert shared.instance_ids[0] == "theirs-newer"


def test_a_provisioned_instance_its_worker_no_longer_has_is_replaced() -> None:
    worker = FakeWorker("w")

    async def provision(scheduler: Scheduler) -> None:
        await scheduler.ensure_provisioned()
        await scheduler._provisioning[SPEC.function_id]

    async def scenario() -> tuple[int, int, list[str], list[str]]:
        scheduler = Scheduler([worker], keepalive_s=60)
        scheduler.set_provisioned(SPEC, 1)
        await provision(scheduler)
        first = list(worker.instance_ids)
        worker.instance_ids.clear()  # the worker stopped it: nobody kept it in time

        await scheduler.keep_provisioned()
        forgotten = scheduler.provisioned_ready(SPEC.function_id)
        await provision(scheduler)
        return forgotten, scheduler.provisioned_ready(SPEC.function_id), first, worker.instance_ids

    forgotten, ready, first, now = asyncio.run(scenario())

    assert (forgotten, ready) == (0, 1)
    assert len(now) == 1 and now != first


class RacingWorker(FakeWorker):
    """Looks for room only after a pause, as a worker fetching a package does."""

    async def start_instance(self, spec: InstanceSpec, *, provisioned: bool = False) -> StartResult:
        await asyncio.sleep(0.01)
        if self.free_mb < spec.memory_mb:
            raise NoRoom(f"{self.worker_id} is full")
        return await super().start_instance(spec, provisioned=provisioned)


def test_a_start_that_loses_its_room_to_another_waits_and_is_served_warm() -> None:
    worker = RacingWorker("small", SPEC.memory_mb)

    async def scenario() -> list[bool]:
        scheduler = Scheduler([worker], keepalive_s=60, capacity_wait_s=2)
        served = await asyncio.gather(
            scheduler.invoke(SPEC, request(), LIMITS), scheduler.invoke(SPEC, request(), LIMITS)
        )
        return sorted(s.cold_start for s in served)

    assert asyncio.run(scenario()) == [False, True]
