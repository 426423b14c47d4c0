"""The registry of API processes: which ones are live, and what that means for this one.

Every API process has a row in ``api_processes`` and heartbeats it every
``LAMBENT_HEARTBEAT_S``; one silent for ``LAMBENT_API_DEAD_AFTER_S`` is no longer live, and the
first to notice deletes it, with its concurrency leases. A process that stops cleanly deletes
its own row. Each heartbeat is one short transaction, serialised with the others' (PostgreSQL:
an advisory lock; SQLite: the write lock), in which the process also learns who else is live
and switches its concurrency ledger (app/scheduler/ledger.py): to the shared table when others
are live, writing leases for what it has in flight in the same transaction; back to its
counters in memory when it is alone. Serialising them means that a process joining and one
going back to its counters cannot miss each other.

Provisioned concurrency is divided among the live processes (Scheduler.provisioned_share). So
that each knows every function's setting, a process re-reads them from the functions table on
each heartbeat while others are live, and once whenever the set of live processes changes; and
it reports how many provisioned instances it has ready, so that any process can tell the total.

Times are the wall clock of each API host, compared with the others': as for workers, the hosts'
clocks must agree to well within ``LAMBENT_API_DEAD_AFTER_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections import Counter
from datetime import timedelta

from sqlalchemy import delete, insert, select, update

from app.db import utcnow
from app.functions.models import Function
from app.functions.service import to_spec
from app.logging import get_logger
from app.platform import Platform
from app.scheduler.ledger import LeaseStore, Slot, lock_key, serialised
from app.scheduler.models import ApiProcess
from app.scheduler.service import Peers

log = get_logger(__name__)

MEMBERSHIP_LOCK = lock_key("lambent api processes")


def new_process_id() -> str:
    """Unique per start; the host and pid in it tell an operator which process a row is."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class ApiProcessRegistry:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.db = platform.db
        self.scheduler = platform.scheduler
        self.ledger = platform.scheduler.ledger
        self.heartbeat_s = platform.settings.heartbeat_s
        self.dead_after_s = platform.settings.api_dead_after_s
        self.id = new_process_id()
        self.started_at = utcnow()
        self.store = LeaseStore(self.db, self.id, dead_after_s=self.dead_after_s)
        self._registered = False
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self) -> None:
        """Register, learn who else is live, and keep heartbeating."""
        self.ledger.store = self.store
        self.ledger.not_ready_wait_s = self.dead_after_s
        await self.beat()
        self._task = asyncio.create_task(self._beat_forever())

    async def close(self) -> None:
        """Leave the registry; the others take over this process's share at their next beat."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.ledger.stop_sharing()
        try:
            async with self.db.engine.begin() as connection:
                await connection.execute(delete(ApiProcess).where(ApiProcess.id == self.id))
        except Exception as exc:  # noqa: BLE001 - the others drop the row once it is stale
            log.warning("could not remove this API process's row", error=repr(exc))
        await self.store.close()

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.beat()
                await self.ledger.delete_undeleted()
            except Exception:  # noqa: BLE001 - the heartbeat must outlive a database outage
                if not self._failing:
                    log.exception("the API process heartbeat failed; retrying")
                self._failing = True
            else:
                if self._failing:
                    log.info("the API process heartbeat works again")
                self._failing = False

    async def beat(self) -> None:
        """Heartbeat, and switch the ledger if this process has just become alone or not."""
        now = utcnow()
        cutoff = now - timedelta(seconds=self.dead_after_s)
        ready = self._provisioned_ready_here()
        ledger = self.ledger
        switching: tuple[list[Slot], list[Slot]] | None = None
        try:
            async with serialised(self.db, MEMBERSHIP_LOCK) as connection:
                # Leases of the processes dropped here go with them (ON DELETE CASCADE).
                dropped = await connection.execute(
                    delete(ApiProcess).where(
                        ApiProcess.id != self.id, ApiProcess.last_seen_at < cutoff
                    )
                )
                seen = await connection.execute(
                    update(ApiProcess)
                    .where(ApiProcess.id == self.id)
                    .values(last_seen_at=now, provisioned=ready)
                )
                others = (
                    await connection.execute(
                        select(ApiProcess.id, ApiProcess.provisioned).where(
                            ApiProcess.id != self.id, ApiProcess.last_seen_at >= cutoff
                        )
                    )
                ).all()
                share = bool(others)
                lost = seen.rowcount == 0
                if lost:
                    if self._registered:
                        log.warning(
                            "the other API processes took this one for dead; registering again",
                            process_id=self.id,
                        )
                    await connection.execute(
                        insert(ApiProcess).values(
                            id=self.id,
                            started_at=self.started_at,
                            last_seen_at=now,
                            shared=share,
                            provisioned=ready,
                        )
                    )
                if share and (lost or not ledger.shared):
                    # Rows for what it has in flight; for all of it when its registration was
                    # deleted, since its rows went with it.
                    switching = ledger.begin_sharing(rewrite=lost)
                    rows, _ = switching
                    await self.store.write(connection, rows)
                    if not lost:
                        await connection.execute(
                            update(ApiProcess).where(ApiProcess.id == self.id).values(shared=True)
                        )
                elif not share and ledger.shared:
                    await connection.execute(
                        update(ApiProcess).where(ApiProcess.id == self.id).values(shared=False)
                    )
        except BaseException:
            if switching is not None:
                ledger.end_sharing(switching[1], written=False)
            raise
        if switching is not None:
            ledger.end_sharing(switching[1], written=True)
        elif not share:
            ledger.stop_sharing()
        self._registered = True
        if dropped.rowcount:
            log.info("dropped API processes that stopped heartbeating", processes=dropped.rowcount)
        await self._learn([(row.id, row.provisioned or {}) for row in others])

    async def _learn(self, others: list[tuple[str, dict[str, int]]]) -> None:
        ids = sorted([self.id, *(process_id for process_id, _ in others)])
        ready: Counter[str] = Counter()
        for _, counts in others:
            ready.update(counts)
        before = self.scheduler.peers
        peers = Peers(index=ids.index(self.id), count=len(ids), provisioned_ready=dict(ready))
        self.scheduler.peers = peers
        changed = (before.index, before.count) != (peers.index, peers.count)
        if changed and peers.count > 1:
            log.info(
                "sharing concurrency limits and provisioned concurrency with other API processes",
                processes=peers.count,
                process_id=self.id,
            )
        elif changed:
            log.info("the only live API process: concurrency is counted in memory again")
        if changed or peers.count > 1:
            await self._refresh_provisioned()

    def _provisioned_ready_here(self) -> dict[str, int]:
        scheduler = self.scheduler
        counts = {
            function_id: scheduler.provisioned_ready_here(function_id)
            for function_id in scheduler.provisioned_settings()
        }
        return {function_id: n for function_id, n in counts.items() if n}

    async def _refresh_provisioned(self) -> None:
        """Take up provisioned concurrency set, changed or removed through another process."""
        scheduler = self.scheduler
        before = scheduler.provisioned_settings()
        async with self.db.sessionmaker() as session:
            functions = (
                await session.scalars(select(Function).where(Function.provisioned_concurrency > 0))
            ).all()
        wanted = {
            fn.id: (to_spec(self.platform, fn), fn.provisioned_concurrency) for fn in functions
        }
        known = scheduler.provisioned_settings()
        for function_id in sorted(set(wanted) | set(known)):
            current = known.get(function_id)
            if current != before.get(function_id):
                continue  # set through this process meanwhile; the next read has it
            target = wanted.get(function_id)
            if target == current:
                continue
            if target is None:
                assert current is not None
                scheduler.set_provisioned(current[0], 0)
                continue
            spec, count = target
            if current is not None and spec.revision > current[0].revision:
                # Changed through another process, which stopped only its own old instances.
                await scheduler.retire(function_id, spec.revision)
            scheduler.set_provisioned(spec, count)
