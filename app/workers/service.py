"""The worker registry: which remote workers the scheduler may use, and whether they are alive.

Every API process shares one registry, the workers table. A worker registers with whichever API
process its control plane URL reaches (behind a load balancer, any of them) and heartbeats
there; that process writes the registration, and each heartbeat as one UPDATE. Every API process
reads the table about once per heartbeat interval and converges on it: it takes up the workers it
does not use yet, refreshes the liveness of those it does from their last heartbeat, and drops
those that deregistered or were forgotten.

A worker silent for ``LAMBENT_WORKER_DEAD_AFTER_S`` is declared dead by the first API process to
notice, in the table, and by every other on its next read. Each then forgets the worker's
instances and fails its own calls in flight to it at once, so callers get an answer within
seconds even when the host vanished without closing its connections. A dead worker's heartbeats
are refused (404), as are those of another boot of it, and it registers again.

Heartbeat times are the wall clock of the API process that received them, compared with the
wall clock of the one reading them: the API hosts' clocks must agree to well within
``LAMBENT_WORKER_DEAD_AFTER_S`` (NTP does).

No API process stops instances it did not start, since they may be another's. Instances that no
API process looks after any more (their API process crashed, or their worker was declared dead
and came back) are stopped by the worker once idle past the keep-alive (workers/agent.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from app.db import Database
from app.errors import InvalidParameterValue, ResourceConflict, ResourceNotFound
from app.logging import get_logger
from app.scheduler.service import Scheduler
from app.settings import Settings
from app.workers.models import WorkerRecord, WorkerStatus
from app.workers.schemas import (
    InstanceCounts,
    WorkerHeartbeat,
    WorkerOut,
    WorkerRegistration,
)
from workers.client import InProcessWorkerClient
from workers.http_client import (
    HttpWorkerClient,
    RemoteWorkerError,
    new_session,
)
from workers.protocol import WorkerUnavailable

log = get_logger(__name__)

PROBE_TIMEOUT_S = 3.0


class UnknownWorker(ResourceNotFound):
    """A heartbeat from a worker that is not registered (or no longer, or under another boot)."""


class WorkerNotReachable(InvalidParameterValue):
    pass


class WorkerStillAlive(ResourceConflict):
    pass


class WorkerIdTaken(ResourceConflict):
    pass


class WorkerRegistry:
    """This API process's view of the workers table, and its writes to it."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        scheduler: Scheduler,
        embedded: InProcessWorkerClient | None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.scheduler = scheduler
        self.embedded = embedded
        self.remote: dict[str, HttpWorkerClient] = {}
        self._session: aiohttp.ClientSession | None = None
        self._watcher: asyncio.Task[None] | None = None
        # Held while the table is read and converged on, and while this process writes a
        # registration and takes it up, so that neither acts on what the other made stale.
        self._lock = asyncio.Lock()
        self._read_failing = False

    async def start(self) -> None:
        """Take up the registered workers, and keep converging on the table."""
        if self.settings.worker_token is None:
            async with self.db.sessionmaker() as session:
                registered = await session.scalar(select(func.count()).select_from(WorkerRecord))
            if registered:
                log.warning(
                    "remote workers are registered but LAMBENT_WORKER_TOKEN is unset; "
                    "not using them",
                    workers=registered,
                )
            return

        self._session = new_session(self.settings.worker_token.get_secret_value())
        # Workers that missed a heartbeat (every API process was down, say) are asked directly,
        # so that those alive are used at once rather than after their next heartbeat.
        now = datetime.now(UTC)
        records = await self._read()
        await asyncio.gather(
            *(
                self._take_back(record)
                for record in records
                if record.status == WorkerStatus.ACTIVE
                and _silent_s(record, now) > self.settings.heartbeat_s
            )
        )
        await self._sync()
        self._watcher = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._session is not None:
            await self._session.close()

    def _client(
        self, worker_id: str, address: str, boot_id: str, capacity_mb: int, cpus: int, sandbox: str
    ) -> HttpWorkerClient:
        assert self._session is not None
        return HttpWorkerClient(
            self._session,
            worker_id=worker_id,
            address=address,
            boot_id=boot_id,
            capacity_mb=capacity_mb,
            cpus=cpus,
            sandbox=sandbox,
            heartbeat_s=self.settings.heartbeat_s,
        )

    def _record_client(self, record: WorkerRecord) -> HttpWorkerClient:
        client = self._client(
            record.id,
            record.address,
            record.boot_id,
            record.capacity_mb,
            record.cpus,
            record.sandbox,
        )
        client.heartbeat(**_usage_of(record), at=record.last_heartbeat_at)
        return client

    async def _take_back(self, record: WorkerRecord) -> None:
        client = self._record_client(record)
        try:
            identity = await client.health(PROBE_TIMEOUT_S)
        except (WorkerUnavailable, RemoteWorkerError) as exc:
            log.warning("a known worker does not answer", worker_id=record.id, error=str(exc))
            return
        if identity.get("worker_id") != record.id:
            log.warning(
                "another worker answers at a known worker's address",
                worker_id=record.id,
                address=record.address,
            )
            return
        async with self._lock:
            await self._write_registration(record.address, identity)

    def _use(self, client: HttpWorkerClient) -> None:
        """Place instances on this worker from now on (in place of an earlier boot of it)."""
        previous = self.remote.get(client.worker_id)
        if previous is not None and not previous.dead and previous.boot_id != client.boot_id:
            previous.mark_dead()  # that boot is gone: its calls in flight fail now
        self.remote[client.worker_id] = client
        self.scheduler.add_worker(client)
        log.info(
            "worker joined",
            worker_id=client.worker_id,
            address=client.address,
            capacity_mb=client.capacity_mb,
        )

    # What workers say, through whichever API process they reach.

    async def register(self, registration: WorkerRegistration) -> None:
        if self.embedded is not None and registration.id == self.embedded.worker_id:
            raise WorkerIdTaken(f"worker id {registration.id!r} is the embedded worker's")
        client = self._client(
            registration.id,
            registration.address,
            registration.boot_id,
            registration.capacity_mb,
            registration.cpus,
            registration.sandbox,
        )
        try:
            identity = await client.health(PROBE_TIMEOUT_S)
        except (WorkerUnavailable, RemoteWorkerError) as exc:
            raise WorkerNotReachable(
                f"the control plane cannot reach worker {registration.id!r} at "
                f"{registration.address}: {exc}"
            ) from None
        if (identity.get("worker_id"), identity.get("boot_id")) != (
            registration.id,
            registration.boot_id,
        ):
            raise WorkerNotReachable(
                f"another worker answers at {registration.address} "
                f"({identity.get('worker_id')!r}, not {registration.id!r})"
            )

        async with self._lock:
            await self._write_registration(registration.address, identity)
            client.identify(identity)
            self._use(client)

    async def _write_registration(self, address: str, identity: dict[str, Any]) -> None:
        now = datetime.now(UTC)
        values = {
            "address": address,
            "boot_id": identity["boot_id"],
            "capacity_mb": identity["capacity_mb"],
            "cpus": identity["cpus"],
            "sandbox": identity["sandbox"],
            "status": WorkerStatus.ACTIVE.value,
            "registered_at": now,
            "last_heartbeat_at": now,
            **_usage_values(identity),
        }
        async with self.db.engine.begin() as connection:
            dialect = connection.dialect.name
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            await connection.execute(
                insert(WorkerRecord)
                .values(id=identity["worker_id"], **values)
                .on_conflict_do_update(index_elements=[WorkerRecord.id], set_=values)
            )

    async def heartbeat(self, worker_id: str, beat: WorkerHeartbeat) -> None:
        """Record a heartbeat; UnknownWorker unless the worker is registered, alive, this boot."""
        now = datetime.now(UTC)
        async with self.db.engine.begin() as connection:
            result = await connection.execute(
                update(WorkerRecord)
                .where(
                    WorkerRecord.id == worker_id,
                    WorkerRecord.boot_id == beat.boot_id,
                    WorkerRecord.status == WorkerStatus.ACTIVE.value,
                )
                .values(last_heartbeat_at=now, **_usage_values(beat.model_dump()))
            )
        if result.rowcount == 0:
            raise UnknownWorker(f"worker {worker_id!r} is not registered; register again")

        client = self.remote.get(worker_id)
        if client is not None and not client.dead and client.boot_id == beat.boot_id:
            client.heartbeat(
                reserved_mb=beat.reserved_mb,
                seq=beat.seq,
                instances=beat.instances,
                draining=beat.draining,
                idle_mb=beat.idle_mb,
                at=now,
            )

    async def deregister(self, worker_id: str) -> None:
        """A worker shutting down: nothing new goes there; calls in flight finish normally."""
        async with self._lock:
            async with self.db.engine.begin() as connection:
                deleted = await connection.execute(
                    delete(WorkerRecord).where(WorkerRecord.id == worker_id)
                )
            known = self._drop(worker_id)
        if not deleted.rowcount and not known:
            raise UnknownWorker(f"worker {worker_id!r} is not registered")
        log.info("worker left", worker_id=worker_id)

    async def forget(self, worker_id: str) -> None:
        """Drop a dead worker from the listing (an operator's clean-up)."""
        async with self._lock:
            async with self.db.engine.begin() as connection:
                status = await connection.scalar(
                    select(WorkerRecord.status).where(WorkerRecord.id == worker_id)
                )
                if status is None:
                    raise ResourceNotFound(f"worker {worker_id!r} does not exist")
                if status != WorkerStatus.DEAD:
                    raise WorkerStillAlive(
                        f"worker {worker_id!r} is alive; stop it and it deregisters itself"
                    )
                await connection.execute(
                    delete(WorkerRecord).where(
                        WorkerRecord.id == worker_id,
                        WorkerRecord.status == WorkerStatus.DEAD.value,
                    )
                )
            self._drop(worker_id)

    def _drop(self, worker_id: str) -> bool:
        """Stop using a worker that left; False if this process did not know it."""
        client = self.remote.pop(worker_id, None)
        if client is None:
            return False
        self.scheduler.remove_worker(worker_id)
        return True

    # Converging on the table.

    async def _watch(self) -> None:
        interval_s = min(max(self.settings.heartbeat_s, 0.1), self.settings.worker_dead_after_s / 4)
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._sync()
            except Exception:  # noqa: BLE001 - the watch must outlive a database outage
                if not self._read_failing:
                    log.exception("reading the workers table failed; retrying")
                self._read_failing = True
            else:
                if self._read_failing:
                    log.info("reading the workers table works again")
                self._read_failing = False

    async def _read(self) -> list[WorkerRecord]:
        async with self.db.sessionmaker() as session:
            return list((await session.scalars(select(WorkerRecord))).all())

    async def _sync(self) -> None:
        async with self._lock:
            records = await self._read()
            registered = {record.id for record in records}
            for worker_id in [w for w in self.remote if w not in registered]:
                self._drop(worker_id)
                log.info("worker left", worker_id=worker_id)
            now = datetime.now(UTC)
            for record in records:
                await self._converge(record, now)

    async def _converge(self, record: WorkerRecord, now: datetime) -> None:
        client = self.remote.get(record.id)
        silent_s = _silent_s(record, now)
        noticed_here = False
        if record.status == WorkerStatus.ACTIVE and silent_s > self.settings.worker_dead_after_s:
            if not await self._write_dead(record, now):
                return  # a heartbeat came in since the read; the next read has it
            noticed_here = True

        if noticed_here or record.status == WorkerStatus.DEAD:
            if client is None:
                client = self._record_client(record)
                client.dead = True
                self.remote[record.id] = client
            elif not client.dead:
                self._declare_dead(client, silent_s, noticed_here=noticed_here)
            client.last_heartbeat_at = record.last_heartbeat_at
            return

        if (
            client is None
            or client.dead
            or client.boot_id != record.boot_id
            or client.address != record.address
        ):
            self._use(self._record_client(record))
        elif record.last_heartbeat_at > client.last_heartbeat_at:
            client.heartbeat(**_usage_of(record), at=record.last_heartbeat_at)

    async def _write_dead(self, record: WorkerRecord, now: datetime) -> bool:
        """Mark the worker dead unless a heartbeat arrived since; True if this process did."""
        cutoff = now - timedelta(seconds=self.settings.worker_dead_after_s)
        async with self.db.engine.begin() as connection:
            result = await connection.execute(
                update(WorkerRecord)
                .where(
                    WorkerRecord.id == record.id,
                    WorkerRecord.boot_id == record.boot_id,
                    WorkerRecord.status == WorkerStatus.ACTIVE.value,
                    WorkerRecord.last_heartbeat_at <= cutoff,
                )
                .values(status=WorkerStatus.DEAD.value)
            )
        return bool(result.rowcount)

    def _declare_dead(
        self, client: HttpWorkerClient, silent_s: float, *, noticed_here: bool
    ) -> None:
        client.mark_dead()
        self.scheduler.remove_worker(client.worker_id)
        if noticed_here:
            log.warning(
                "worker missed its heartbeats; declared dead",
                worker_id=client.worker_id,
                address=client.address,
                silent_s=round(silent_s, 1),
            )
        else:
            log.info("worker declared dead by another API process", worker_id=client.worker_id)

    # Visibility.

    def listing(self) -> list[WorkerOut]:
        workers: list[WorkerOut] = []
        if self.embedded is not None:
            worker = self.embedded.worker
            usage = worker.usage()
            workers.append(
                WorkerOut(
                    id=worker.worker_id,
                    address=None,
                    kind="embedded",
                    sandbox=worker.backend.name,
                    capacity_mb=worker.config.memory_mb,
                    cpus=os.cpu_count() or 1,
                    used_mb=usage.reserved_mb,
                    free_mb=worker.free_mb,
                    instances=InstanceCounts(**_live_counts(usage.instances)),
                    last_heartbeat_at=None,
                    status="draining" if usage.draining else "healthy",
                )
            )
        for client in sorted(self.remote.values(), key=lambda c: c.worker_id):
            free_mb = 0 if client.dead else client.free_mb
            workers.append(
                WorkerOut(
                    id=client.worker_id,
                    address=client.address,
                    kind="remote",
                    sandbox=client.sandbox,
                    capacity_mb=client.capacity_mb,
                    cpus=client.cpus,
                    used_mb=0 if client.dead else client.capacity_mb - free_mb,
                    free_mb=free_mb,
                    instances=InstanceCounts(
                        **({} if client.dead else _live_counts(client.instance_counts))
                    ),
                    last_heartbeat_at=client.last_heartbeat_at,
                    status=_status(client),
                )
            )
        return workers


def _live_counts(counts: dict[str, int]) -> dict[str, int]:
    return {state: counts.get(state, 0) for state in ("initializing", "idle", "busy")}


def _status(client: HttpWorkerClient) -> str:
    if client.dead:
        return "dead"
    if client.draining:
        return "draining"
    return "healthy" if client.healthy else "unhealthy"


def _silent_s(record: WorkerRecord, now: datetime) -> float:
    return (now - record.last_heartbeat_at).total_seconds()


def _usage_values(usage: Mapping[str, Any]) -> dict[str, Any]:
    """The workers table's columns of a heartbeat (or a health answer)."""
    instances = usage.get("instances") or {}
    return {
        "reserved_mb": usage["reserved_mb"],
        "reserved_seq": usage["seq"],
        "idle_mb": usage.get("idle_mb", 0),
        "instances_initializing": instances.get("initializing", 0),
        "instances_idle": instances.get("idle", 0),
        "instances_busy": instances.get("busy", 0),
        "draining": usage["draining"],
    }


def _usage_of(record: WorkerRecord) -> dict[str, Any]:
    """A heartbeat as the workers table keeps it."""
    return {
        "reserved_mb": record.reserved_mb,
        "seq": record.reserved_seq,
        "instances": {
            "initializing": record.instances_initializing,
            "idle": record.instances_idle,
            "busy": record.instances_busy,
        },
        "draining": record.draining,
        "idle_mb": record.idle_mb,
    }
