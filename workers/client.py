"""How the control plane reaches a worker.

The scheduler only ever holds ``WorkerClient`` objects, so a worker inside ``lambent serve`` and
one on another host look the same to it.
"""

from __future__ import annotations

from typing import Protocol

from workers.agent import InstanceInfo, Worker
from workers.protocol import InstanceSpec, InvokeRequest, InvokeResult, StartResult


class WorkerClient(Protocol):
    worker_id: str

    @property
    def capacity_mb(self) -> int: ...

    @property
    def free_mb(self) -> int: ...

    @property
    def idle_mb(self) -> int:
        """Memory of idle instances the worker stops itself when a new one needs the room."""

    @property
    def healthy(self) -> bool:
        """False once the worker missed its heartbeats; nothing new is placed on it."""

    @property
    def sandbox(self) -> str:
        """The worker's sandbox backend: "process" or "docker" (which alone runs images)."""

    async def start_instance(
        self, spec: InstanceSpec, *, provisioned: bool = False
    ) -> StartResult: ...

    async def invoke(self, instance_id: str, request: InvokeRequest) -> InvokeResult: ...

    async def stop_instance(self, instance_id: str) -> None: ...

    async def keep_instances(self, instance_ids: list[str]) -> list[str]:
        """Keep these (provisioned) instances from being stopped as idle; returns those gone."""

    async def instances(self) -> list[InstanceInfo]: ...


class InProcessWorkerClient:
    """Calls a worker that lives in the same process."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.worker_id = worker.worker_id

    @property
    def capacity_mb(self) -> int:
        return self.worker.config.memory_mb

    @property
    def free_mb(self) -> int:
        return self.worker.free_mb

    @property
    def idle_mb(self) -> int:
        return self.worker.idle_mb

    @property
    def healthy(self) -> bool:
        return True

    @property
    def sandbox(self) -> str:
        return self.worker.backend.name

    async def start_instance(self, spec: InstanceSpec, *, provisioned: bool = False) -> StartResult:
        return await self.worker.start_instance(spec, provisioned=provisioned)

    async def invoke(self, instance_id: str, request: InvokeRequest) -> InvokeResult:
        return await self.worker.invoke(instance_id, request)

    async def stop_instance(self, instance_id: str) -> None:
        await self.worker.stop_instance(instance_id)

    async def keep_instances(self, instance_ids: list[str]) -> list[str]:
        return self.worker.keep_instances(instance_ids)

    async def instances(self) -> list[InstanceInfo]:
        return self.worker.instances()
