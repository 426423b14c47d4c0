from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field

WorkerId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
# HOST:PORT, with an IPv6 host in brackets.
Address = Annotated[
    str, Field(pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$", max_length=255)
]


class WorkerRegistration(BaseModel):
    """What a starting worker tells the control plane about itself."""

    id: WorkerId
    address: Address
    boot_id: str = Field(min_length=1, max_length=64, description="New on every worker start.")
    capacity_mb: int = Field(ge=0)
    cpus: int = Field(ge=1)
    sandbox: str = Field(max_length=32)


class WorkerHeartbeat(BaseModel):
    boot_id: str = Field(min_length=1, max_length=64)
    reserved_mb: int = Field(ge=0)
    seq: int
    instances: dict[str, int] = Field(default_factory=dict)
    draining: bool = False
    idle_mb: int = Field(0, ge=0, description="Idle instances' memory the worker would reclaim.")


class InstanceCounts(BaseModel):
    initializing: int = 0
    idle: int = 0
    busy: int = 0


class WorkerOut(BaseModel):
    id: str
    address: str | None = Field(description="HOST:PORT of a remote worker; null when embedded")
    kind: Literal["embedded", "remote"]
    sandbox: str
    capacity_mb: int
    cpus: int
    used_mb: int
    free_mb: int
    instances: InstanceCounts = Field(description="as of the worker's last heartbeat")
    last_heartbeat_at: datetime | None = Field(description="null for the embedded worker")
    status: Literal["healthy", "unhealthy", "draining", "dead"] = Field(
        description="unhealthy: a heartbeat is late or a call failed, so nothing new is placed "
        "there; dead: silent past LAMBENT_WORKER_DEAD_AFTER_S"
    )


class WorkerList(BaseModel):
    workers: list[WorkerOut]
