"""Counting invocations in flight against their concurrency limits, across API processes.

Each API process admits the invocations it serves. While it is the only live one
(app/scheduler/processes.py), what it has in flight is all there is, and admission is a few
counter updates in memory. While others are live, each invocation also holds a row in
``concurrency_leases`` for as long as it runs: admission is one short transaction that counts
the live rows of its scope (the function's, under a reservation; else the tenant's unreserved
ones) and adds its own if there is room, serialised per tenant (PostgreSQL: an advisory lock on
the tenant; SQLite: the write lock), and release deletes the row. Rows of API processes that are
no longer live do not count, so a killed process holds concurrency only until it is declared
gone.

The counters in memory are kept in both modes, so a switch loses nothing: a process that starts
sharing writes rows for what it has in flight, in the transaction that tells the others it
shares, and one that stops sharing counts everything already. A process's invocations are in
the table only once it shares, so an admission waits while another live process does not share
yet (it does so at its next heartbeat, having seen this one).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

import asyncpg
from sqlalchemy import func, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db import Database, utcnow
from app.logging import get_logger
from app.scheduler.models import ConcurrencyLease

log = get_logger(__name__)

# How soon an admission looks again whether a process that has just seen this one shares yet.
NOT_READY_RETRY_S = 0.05


class SlotState(Enum):
    LOCAL = "local"  # counted in this process's memory only
    PENDING = "pending"  # its admission is writing its lease row
    LEASED = "leased"  # it has a lease row (or one is being written by a switch to sharing)


@dataclass(eq=False, slots=True)
class Slot:
    """One invocation's place under its concurrency limits, held while it runs."""

    tenant_id: str
    function_id: str
    reserved: bool  # admitted under the function's reservation, not the tenant's unreserved rest
    seq: int  # unique in this process; the lease row's key with the process id
    state: SlotState = SlotState.LOCAL


class Admission(Enum):
    ADMITTED = "admitted"
    THROTTLED = "throttled"
    NOT_READY = "not ready"  # a live process does not share yet, or this one is not registered


def lock_key(name: str) -> int:
    """A stable 64-bit key for PostgreSQL's advisory locks (Python's hash() differs per process)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@contextlib.asynccontextmanager
async def serialised(db: Database, key: int) -> AsyncIterator[AsyncConnection]:
    """A write transaction that no other one with the same key runs beside, in any process.

    SQLite has one write lock for the whole database, taken at the start (BEGIN IMMEDIATE) so
    that what the transaction reads cannot change before it writes.
    """
    async with db.engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            async with connection.begin():
                await connection.execute(select(func.pg_advisory_xact_lock(key)))
                yield connection
            return
        await connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            await connection.rollback()
            raise
        await connection.commit()


# The admission statement. It adds the invocation's lease only if the live leases of its scope
# leave room (and, unless told otherwise, only if every live process shares), so that one
# statement both decides and records; the transaction around it is serialised per tenant.
ADMIT_SQL = """
INSERT INTO concurrency_leases (process_id, seq, tenant_id, function_id, reserved, created_at)
SELECT {process_id}, {seq}, {tenant_id}, {function_id}, {reserved}, {now}
WHERE (
    SELECT count(*)
    FROM concurrency_leases AS lease
    JOIN api_processes AS process ON process.id = lease.process_id
    WHERE process.last_seen_at >= {cutoff} AND {scope}
) < {limit}
"""
RESERVED_SCOPE = "lease.function_id = {function_id}"
UNRESERVED_SCOPE = "lease.tenant_id = {tenant_id} AND NOT lease.reserved"
ALL_SHARE = (
    "AND NOT EXISTS (SELECT 1 FROM api_processes WHERE last_seen_at >= {cutoff} AND NOT shared)\n"
)
NOT_SHARING_SQL = (
    "SELECT EXISTS (SELECT 1 FROM api_processes WHERE last_seen_at >= {cutoff} AND NOT shared)"
)
RELEASE_SQL = "DELETE FROM concurrency_leases WHERE process_id = {process_id} AND seq = {seq}"

# asyncpg numbers its parameters, and PostgreSQL needs their types where the statement leaves
# them open; the standard library's SQLite driver takes them by name.
POSTGRES_PARAMETERS = {
    "process_id": "$1::varchar",
    "seq": "$2::bigint",
    "tenant_id": "$3::varchar",
    "function_id": "$4::varchar",
    "reserved": "$5::boolean",
    "now": "$6::timestamptz",
    "cutoff": "$7::timestamptz",
    "limit": "$8::bigint",
}
SQLITE_PARAMETERS = {name: f":{name}" for name in POSTGRES_PARAMETERS}


def admission_statements(parameters: dict[str, str]) -> dict[tuple[bool, bool], str]:
    """``admission_sql`` for every (reserved, wait_for_others), in one driver's parameters."""
    return {
        (reserved, wait): admission_sql(parameters, reserved=reserved, wait_for_others=wait)
        for reserved in (False, True)
        for wait in (False, True)
    }


def admission_sql(parameters: dict[str, str], *, reserved: bool, wait_for_others: bool) -> str:
    scope = (RESERVED_SCOPE if reserved else UNRESERVED_SCOPE).format(**parameters)
    sql = ADMIT_SQL.format(scope=scope, **parameters)
    if wait_for_others:
        sql += ALL_SHARE.format(**parameters)
    return sql


class LeaseStore:
    """This process's rows in concurrency_leases, and the counts of every live process's.

    Admission and release are on the invoke path, so they go through the database's own driver
    (asyncpg; the standard library's sqlite3) with statements written out, rather than through
    SQLAlchemy and its pool: an admission is then three round trips to PostgreSQL (begin and
    lock, insert, commit), a release one.
    """

    def __init__(self, db: Database, process_id: str, *, dead_after_s: float) -> None:
        self.db = db
        self.process_id = process_id
        self.dead_after_s = dead_after_s
        url = make_url(db.url)
        self._driver: PostgresLeases | SqliteLeases
        if url.get_backend_name() == "postgresql":
            dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
            self._driver = PostgresLeases(dsn)
        else:
            self._driver = SqliteLeases(str(url.database))

    async def admit(self, slot: Slot, limit: int, *, wait_for_others: bool = True) -> Admission:
        now = utcnow()
        values = {
            "process_id": self.process_id,
            "seq": slot.seq,
            "tenant_id": slot.tenant_id,
            "function_id": slot.function_id,
            "reserved": slot.reserved,
            "now": now,
            "cutoff": now - timedelta(seconds=self.dead_after_s),
            "limit": limit,
        }
        return await self._driver.admit(
            lock_key(slot.tenant_id),
            values,
            reserved=slot.reserved,
            wait_for_others=wait_for_others,
        )

    async def write(self, connection: AsyncConnection, slots: list[Slot]) -> None:
        """Lease rows for invocations already admitted, in the caller's transaction."""
        if not slots:
            return
        now = utcnow()
        await connection.execute(
            insert(ConcurrencyLease),
            [
                {
                    "process_id": self.process_id,
                    "seq": slot.seq,
                    "tenant_id": slot.tenant_id,
                    "function_id": slot.function_id,
                    "reserved": slot.reserved,
                    "created_at": now,
                }
                for slot in slots
            ],
        )

    async def delete(self, seqs: list[int]) -> None:
        await self._driver.delete(self.process_id, seqs)

    async def close(self) -> None:
        await self._driver.close()


class PostgresLeases:
    """Admissions through a few asyncpg connections of their own, opened as they are needed."""

    CONNECTIONS = 8

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._idle: list[asyncpg.Connection] = []
        self._slots = asyncio.Semaphore(self.CONNECTIONS)
        self._statements = admission_statements(POSTGRES_PARAMETERS)
        self._not_sharing = NOT_SHARING_SQL.format(cutoff="$1::timestamptz")
        self._release = RELEASE_SQL.format(process_id="$1::varchar", seq="$2::bigint")
        self._release_many = (
            "DELETE FROM concurrency_leases WHERE process_id = $1::varchar AND seq = ANY($2)"
        )

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._slots:
            connection = self._idle.pop() if self._idle else await self._connect()
            try:
                yield connection
            except BaseException:
                # Its state is unknown (a transaction open, a query cancelled half way): the
                # server rolls back whatever it was doing when it closes.
                connection.terminate()
                raise
            self._idle.append(connection)

    async def _connect(self) -> asyncpg.Connection:
        # A lease matters only while its invocation runs: one lost with a crashing server's
        # last moments counts short until that invocation ends. Not worth a flush per commit.
        return await asyncpg.connect(self.dsn, server_settings={"synchronous_commit": "off"})

    async def admit(
        self, lock: int, values: dict[str, Any], *, reserved: bool, wait_for_others: bool
    ) -> Admission:
        sql = self._statements[(reserved, wait_for_others)]
        async with self._connection() as connection:
            # The lock is a statement of its own: a statement sees what was committed when it
            # began, so the count must begin once the lock is held. Sent with BEGIN in one
            # round trip, which a statement without parameters may; the key is our integer.
            await connection.execute(f"BEGIN; SELECT pg_advisory_xact_lock({int(lock)})")
            try:
                status = await connection.execute(sql, *(values[n] for n in POSTGRES_PARAMETERS))
            except asyncpg.ForeignKeyViolationError:
                await connection.execute("ROLLBACK")
                return Admission.NOT_READY
            if status.endswith(" 1"):
                outcome = Admission.ADMITTED
            elif wait_for_others and await connection.fetchval(self._not_sharing, values["cutoff"]):
                outcome = Admission.NOT_READY
            else:
                outcome = Admission.THROTTLED
            await connection.execute("COMMIT")
            return outcome

    async def delete(self, process_id: str, seqs: list[int]) -> None:
        async with self._connection() as connection:
            if len(seqs) == 1:
                await connection.execute(self._release, process_id, seqs[0])
            else:
                await connection.execute(self._release_many, process_id, seqs)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            with contextlib.suppress(Exception):
                await connection.close(timeout=2)


class SqliteLeases:
    """Admissions through a connection of their own, on the event loop's thread.

    A transaction here is an insert and a commit, tens of microseconds, less than one hand-off
    to the thread of an async driver. It never waits for the write lock: when another
    connection holds it, the attempt fails at once and is retried after a short sleep, so the
    loop is never blocked.
    """

    LOCK_WAIT_S = 30.0

    def __init__(self, path: str) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None
        self._statements = admission_statements(SQLITE_PARAMETERS)
        self._not_sharing = NOT_SHARING_SQL.format(cutoff=":cutoff")
        self._release = RELEASE_SQL.format(process_id=":process_id", seq=":seq")

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            for pragma in ("synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=0"):
                connection.execute(f"PRAGMA {pragma}")
            self._connection = connection
        return self._connection

    async def _begin(self) -> sqlite3.Connection:
        """The connection, in a transaction that holds the write lock."""
        connection = self._connect()
        deadline = time.monotonic() + self.LOCK_WAIT_S
        pause = 0.001
        while True:
            try:
                connection.execute("BEGIN IMMEDIATE")
                return connection
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"SQLite's write lock stayed taken for {self.LOCK_WAIT_S} s")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)

    async def admit(
        self, lock: int, values: dict[str, Any], *, reserved: bool, wait_for_others: bool
    ) -> Admission:
        stored = {name: _sqlite_value(value) for name, value in values.items()}
        connection = await self._begin()
        # Nothing below awaits, so no other admission runs on the connection meanwhile.
        try:
            cursor = connection.execute(self._statements[(reserved, wait_for_others)], stored)
            if cursor.rowcount == 1:
                outcome = Admission.ADMITTED
            elif wait_for_others and connection.execute(self._not_sharing, stored).fetchone()[0]:
                outcome = Admission.NOT_READY
            else:
                outcome = Admission.THROTTLED
            connection.execute("COMMIT")
        except sqlite3.IntegrityError:
            connection.execute("ROLLBACK")
            return Admission.NOT_READY
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise
        return outcome

    async def delete(self, process_id: str, seqs: list[int]) -> None:
        connection = await self._begin()
        try:
            connection.executemany(
                self._release, [{"process_id": process_id, "seq": seq} for seq in seqs]
            )
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, datetime):
        # The text form SQLAlchemy stores SQLite timestamps in, which the comparisons rely on.
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, bool):
        return int(value)
    return value


class ConcurrencyLedger:
    """This process's invocations in flight, and their leases while it shares them."""

    def __init__(self) -> None:
        self.function: Counter[str] = Counter()  # in flight, per function id
        self.unreserved: Counter[str] = Counter()  # in flight without a reservation, per tenant
        self.held: set[Slot] = set()
        # Set by the API process registry: the table, and whether other live processes share it.
        self.store: LeaseStore | None = None
        self.shared = False
        # How long an admission waits for a live process to share before it counts without it.
        self.not_ready_wait_s = 5.0
        self._seq = itertools.count(1)
        self._switch: asyncio.Future[None] | None = None
        self._undeleted: set[int] = set()
        self._failing = False

    # This process's own count: the whole count while it is the only live process.

    def admit(self, tenant_id: str, function_id: str, reserved: bool, limit: int) -> Slot | None:
        """A slot, unless this process's invocations in flight fill ``limit`` already."""
        in_flight = self.function[function_id] if reserved else self.unreserved[tenant_id]
        if in_flight >= limit:
            return None
        slot = Slot(tenant_id, function_id, reserved, next(self._seq))
        self.function[function_id] += 1
        if not reserved:
            self.unreserved[tenant_id] += 1
        self.held.add(slot)
        return slot

    def release(self, slot: Slot) -> None:
        self.held.discard(slot)
        self.function[slot.function_id] -= 1
        if not slot.reserved:
            self.unreserved[slot.tenant_id] -= 1

    # Every live process's count.

    async def admit_shared(
        self, tenant_id: str, function_id: str, reserved: bool, limit: int
    ) -> Slot | None:
        """A slot, unless the invocations in flight of every live API process fill ``limit``."""
        slot = self.admit(tenant_id, function_id, reserved, limit)
        if slot is None:
            return None
        slot.state = SlotState.PENDING
        deadline: float | None = None
        while True:
            if self._switch is not None:
                await asyncio.shield(self._switch)
            store = self.store
            if not self.shared or store is None:
                # The others went while this one waited: its own count is the whole count.
                slot.state = SlotState.LOCAL
                return slot
            patient = deadline is None or time.monotonic() < deadline
            try:
                outcome = await store.admit(slot, limit, wait_for_others=patient)
            except Exception as exc:  # noqa: BLE001 - an outage must not stop invocations
                self._note_failure("admit", exc)
                slot.state = SlotState.LOCAL
                return slot
            self._failing = False
            if outcome is Admission.ADMITTED:
                if not patient:
                    log.warning(
                        "an API process did not start sharing concurrency in time; admitted "
                        "without counting its invocations",
                        waited_s=self.not_ready_wait_s,
                    )
                slot.state = SlotState.LEASED
                return slot
            if outcome is Admission.THROTTLED:
                slot.state = SlotState.LOCAL
                self.release(slot)
                return None
            if deadline is None:
                deadline = time.monotonic() + self.not_ready_wait_s
            elif not patient:
                # Still not registered: the database refuses this process's row, say.
                self._note_failure("admit", RuntimeError("this API process is not registered"))
                slot.state = SlotState.LOCAL
                return slot
            await asyncio.sleep(NOT_READY_RETRY_S)

    async def release_leased(self, slot: Slot) -> None:
        """Release a slot with a lease row: at once here, and in the table before returning."""
        self.release(slot)
        # Shielded: a cancelled invocation must still give its lease back.
        await asyncio.shield(self._delete(slot))

    async def _delete(self, slot: Slot) -> None:
        if self._switch is not None:
            await asyncio.shield(self._switch)  # its row may be being written now
        if slot.state is not SlotState.LEASED or self.store is None:
            return
        try:
            await self.store.delete([slot.seq])
        except Exception as exc:  # noqa: BLE001 - the heartbeat deletes it later
            self._note_failure("release", exc)
            self._undeleted.add(slot.seq)

    async def delete_undeleted(self) -> None:
        """Delete the lease rows whose release failed (the database was unreachable, say)."""
        if not self._undeleted or self.store is None:
            return
        seqs = list(self._undeleted)
        await self.store.delete(seqs)
        self._undeleted.difference_update(seqs)

    def _note_failure(self, action: str, exc: Exception) -> None:
        if not self._failing:
            log.warning(
                "the shared concurrency table failed; this process counts its own invocations "
                "only until it works again",
                action=action,
                error=repr(exc),
            )
        self._failing = True

    # Switching, by the API process registry's heartbeat.

    def begin_sharing(self, *, rewrite: bool) -> tuple[list[Slot], list[Slot]]:
        """The slots in flight that need a lease row now, and those of them that had none.

        ``rewrite``: this process's rows were deleted by the others (they took it for dead), so
        its leased slots need theirs again. Admissions and releases wait for end_sharing.
        """
        self._switch = asyncio.get_running_loop().create_future()
        local = [slot for slot in self.held if slot.state is SlotState.LOCAL]
        rows = list(local)
        if rewrite:
            rows += [slot for slot in self.held if slot.state is SlotState.LEASED]
        for slot in local:
            slot.state = SlotState.LEASED
        return rows, local

    def end_sharing(self, local: list[Slot], *, written: bool) -> None:
        if written:
            self.shared = True
        else:
            for slot in local:
                slot.state = SlotState.LOCAL
        switch, self._switch = self._switch, None
        if switch is not None:
            switch.set_result(None)

    def stop_sharing(self) -> None:
        """The only live process again: admit from the counters in memory."""
        self.shared = False
