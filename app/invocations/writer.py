"""Writes invocation outcomes and their usage records.

Every invocation ends with two rows, its final status and its usage record, written in one
transaction. How, and when its caller is answered, depends on the database.

PostgreSQL (``BatchWriter``): the rows are committed before the caller is answered. Done one by
one from concurrent requests, those transactions would each pay a round trip and a commit; here
one task writes: it takes everything queued, writes it in one transaction, commits, and only
then wakes each caller. Under load a batch holds many invocations; alone, one waits for no one.
A failed batch fails each caller in it.

SQLite (``SqliteWriter``): the rows are appended to this process's journal file (one write(2))
and the caller is answered; they are committed a few milliseconds later (``COMMIT_DELAY_S``),
together with whatever else finished meanwhile, on the event loop's own thread, through the
standard library's driver. The journal line survives the process being killed,
which is all SQLite itself promises with synchronous=NORMAL (it does not fsync either), and a
restart commits what a dead process left in its journal. The commit (two rows in several
B-trees, some ten WAL frames) is thus off the caller's wait, which it used to dominate, and
shared by the invocations of those milliseconds: committed one by one, right after each answer,
it competed for the cores with the next request. Reads of invocation records commit what this
process has not committed yet at once and wait for it (``settled``), so a caller that reads its
own invocation back finds it. The connection never waits for SQLite's write lock:
when another connection holds it (a rollup, an API change), the attempt fails at once and a task
retries after a short sleep, so the event loop is never blocked on a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import Depends
from sqlalchemy import Table, TypeDecorator, insert
from sqlalchemy.engine import make_url
from sqlalchemy.types import TypeEngine

from app.invocations import journal
from app.invocations.journal import Entry, Journal
from app.invocations.models import Invocation
from app.logging import get_logger
from app.metering import recorder
from app.metering.models import LateHour, UsageRecord
from app.platform import Platform, get_platform

log = get_logger(__name__)

MAX_BATCH = 256
# How long the SQLite writer lets journaled invocations gather before it commits them, unless a
# read asks for them first or a full batch is waiting.
COMMIT_DELAY_S = 0.005
LOCK_RETRY_FIRST_S = 0.001
LOCK_RETRY_MAX_S = 0.05
# A commit that failed for another reason than the lock (a full disk) is retried this often;
# the rows are safe in the journal meanwhile.
FAILURE_RETRY_S = 1.0
# How often the WAL is checkpointed, from a thread, when invocations were committed meanwhile.
CHECKPOINT_EVERY_S = 1.0
# How long close() keeps trying to commit what is left; what it cannot stays in the journal.
CLOSE_WAIT_S = 5.0

# The text form SQLAlchemy stores SQLite timestamps in; rollups and every query rely on it.
SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"


class InvocationWriter:
    """What the invoke path writes its records through."""

    def start(self) -> None: ...

    async def close(self) -> None: ...

    async def write(self, invocation_row: dict[str, Any], usage_row: dict[str, Any]) -> None:
        """Return once the rows are durable: committed, or journaled to be committed."""
        raise NotImplementedError

    async def settled(self) -> None:
        """Return once everything written through this process so far is committed."""


async def records_settled(platform: Platform = Depends(get_platform)) -> None:
    """A dependency of the routes that read invocation and usage records: they see every
    invocation this process has answered."""
    if platform.writer is not None:
        await platform.writer.settled()


def open_writer(platform: Platform) -> InvocationWriter:
    url = make_url(platform.db.url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return SqliteWriter(platform, str(url.database))
    return BatchWriter(platform)


# The invocation row, its usage row, and the future of the caller waiting for them.
Item = tuple[dict[str, Any], dict[str, Any], asyncio.Future[None]]


class BatchWriter(InvocationWriter):
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            *_, waiter = self._queue.get_nowait()
            if not waiter.done():
                waiter.set_exception(RuntimeError("the platform is shutting down"))

    async def write(self, invocation_row: dict[str, Any], usage_row: dict[str, Any]) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((invocation_row, usage_row, waiter))
        # Shielded: a caller that goes away must not cancel a write already under way.
        await asyncio.shield(waiter)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            except Exception as exc:  # noqa: BLE001 - each caller gets the failure instead
                log.exception("writing invocation records failed", invocations=len(batch))
                for *_, waiter in batch:
                    if not waiter.done():
                        waiter.set_exception(exc)
                continue
            for *_, waiter in batch:
                if not waiter.done():
                    waiter.set_result(None)

    async def _write(self, batch: list[Item]) -> None:
        invocations = [item[0] for item in batch]
        usage = [item[1] for item in batch] if self.platform.settings.metering_enabled else []
        async with self.platform.db.engine.begin() as connection:
            await connection.execute(insert(Invocation), invocations)
            await recorder.record_usage_many(self.platform, connection, usage)


# A journaled invocation waiting for its commit: its journal entry and its usage row.
Pending = tuple[Entry, dict[str, Any] | None]


class SqliteWriter(InvocationWriter):
    def __init__(self, platform: Platform, path: str) -> None:
        self.platform = platform
        self.rows = SqliteRows(path)
        self.journal_dir = platform.settings.data_dir / "journal"
        self._journal: Journal | None = None
        self._pending: list[Pending] = []
        self._commit_timer: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retrying: asyncio.Task[None] | None = None
        self._settle_waiters: list[asyncio.Future[None]] = []
        self._commits = 0
        self._checkpointer: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.recover()
        self._loop = asyncio.get_running_loop()
        self._journal = Journal(self.journal_dir)
        self._checkpointer = asyncio.create_task(self._checkpoint_forever())

    async def _checkpoint_forever(self) -> None:
        checkpointed = 0
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY_S)
            if self._commits == checkpointed:
                continue
            checkpointed = self._commits
            try:
                await asyncio.to_thread(self.rows.checkpoint)
            except sqlite3.Error:
                log.warning("checkpointing the WAL failed", exc_info=True)

    def recover(self) -> int:
        """Commit what dead processes left in their journals; how many invocations that was."""
        recovered = 0
        for path, entries in journal.orphans(self.journal_dir):
            if entries:
                while not self.rows.write_entries(entries, recovered=True):
                    time.sleep(LOCK_RETRY_MAX_S)
            path.unlink(missing_ok=True)
            recovered += len(entries)
        if recovered:
            log.info("invocation records recovered from journals", invocations=recovered)
        return recovered

    async def close(self) -> None:
        deadline = time.monotonic() + CLOSE_WAIT_S
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
        if self._retrying is not None:
            self._retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrying
        while self._pending and time.monotonic() < deadline:
            try:
                if self._commit(self._pending):
                    break
            except Exception:  # noqa: BLE001 - left in the journal for the next start
                log.exception("committing invocation records failed at shutdown")
            await asyncio.sleep(LOCK_RETRY_MAX_S)
        if self._journal is not None:
            self._journal.close(committed=not self._pending)
        if self._pending:
            log.warning(
                "invocation records left in the journal for the next start",
                invocations=len(self._pending),
            )
        self.rows.close()

    async def write(self, invocation_row: dict[str, Any], usage_row: dict[str, Any]) -> None:
        loop = self._loop
        assert self._journal is not None and loop is not None, "the writer is not started"
        metered = self.platform.settings.metering_enabled
        entry: Entry = (
            self.rows.invocations.values(invocation_row),
            self.rows.usage.values(usage_row) if metered else None,
        )
        self._journal.append(entry)
        self._pending.append((entry, usage_row if metered else None))
        if self._retrying is not None:
            return  # the retrying task commits it
        if self._commit_timer is None:
            self._commit_timer = loop.call_later(COMMIT_DELAY_S, self._commit_now)
        elif len(self._pending) == MAX_BATCH:
            # A full batch: committed after the current task step, which answers the caller.
            self._commit_timer.cancel()
            self._commit_timer = loop.call_soon(self._commit_now)

    async def settled(self) -> None:
        if not self._pending:
            return
        if self._commit_timer is not None:
            # A reader is waiting: no point gathering more.
            self._commit_timer.cancel()
            self._commit_now()
            if not self._pending:
                return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._settle_waiters.append(waiter)
        await waiter

    def _commit_now(self) -> None:
        self._commit_timer = None
        if not self._pending or self._retrying is not None:
            return
        try:
            if self._commit(self._pending):
                return
        except Exception:  # noqa: BLE001 - the rows wait in the journal; the task retries
            log.exception("committing invocation records failed; retrying")
        self._retrying = asyncio.get_running_loop().create_task(self._retry())

    async def _retry(self) -> None:
        pause = LOCK_RETRY_FIRST_S
        try:
            while self._pending:
                try:
                    committed = self._commit(self._pending)
                except Exception:  # noqa: BLE001 - the rows wait in the journal meanwhile
                    log.exception("committing invocation records failed; retrying")
                    await asyncio.sleep(FAILURE_RETRY_S)
                    continue
                if not committed:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, LOCK_RETRY_MAX_S)
        finally:
            self._retrying = None

    def _commit(self, pending: list[Pending]) -> bool:
        """Commit everything pending; False, with nothing written, if the lock is taken."""
        batch = pending[: MAX_BATCH * 4]
        usage = [row for _, row in batch if row is not None]
        late = recorder.late_hour_rows(recorder.late_records(self.platform, usage))
        if not self.rows.write_entries([entry for entry, _ in batch], late=late):
            return False
        del pending[: len(batch)]
        self._commits += 1
        if usage:
            recorder.note_usage(self.platform, usage)
        if not pending:
            assert self._journal is not None
            self._journal.all_committed()
            for waiter in self._settle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._settle_waiters.clear()
        return not pending or self._commit(pending)


class SqliteRows:
    """The writer's own connection to the SQLite file, through the standard library's driver."""

    def __init__(self, path: str) -> None:
        self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # The same settings as every other connection (app.db), except that a taken write lock
        # fails at once rather than blocking the event loop.
        # It does not checkpoint the WAL either: done in a commit, a checkpoint copies about a
        # thousand pages into the database file and syncs it, several milliseconds of the event
        # loop once every hundred or so invocations. SqliteWriter checkpoints from a thread.
        pragmas = (
            "synchronous=NORMAL",
            "foreign_keys=ON",
            "busy_timeout=0",
            "wal_autocheckpoint=0",
        )
        for pragma in pragmas:
            self.connection.execute(f"PRAGMA {pragma}")
        self.path = path
        self.invocations = _Insert(Invocation.__table__)  # type: ignore[arg-type]
        self.usage = _Insert(UsageRecord.__table__)  # type: ignore[arg-type]
        self.late = _Insert(LateHour.__table__, on_conflict="ON CONFLICT DO NOTHING")  # type: ignore[arg-type]

    def write_entries(
        self,
        entries: list[Entry],
        *,
        late: list[dict[str, Any]] | None = None,
        recovered: bool = False,
    ) -> bool:
        """Write journal entries in one transaction; False, with nothing written, if the lock
        is taken. ``late`` hours are marked too; a recovered entry's own hour always is, and
        recovered entries already in the database are skipped."""
        invocations = [entry[0] for entry in entries]
        usage = [entry[1] for entry in entries if entry[1] is not None]
        late_values = [self.late.values(row) for row in late or []]
        if recovered:
            late_values += [self.late.values(row) for row in _hours_of(self.usage, usage)]
        connection = self.connection
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                return False
            raise
        try:
            self.invocations.run(connection, invocations, skip_existing=recovered)
            if usage:
                self.usage.run(connection, usage, skip_existing=recovered)
            if late_values:
                self.late.run(connection, late_values)
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise
        return True

    def checkpoint(self) -> None:
        """Copy the WAL's committed pages into the database file; run it in a thread.

        PASSIVE: it takes no lock that the writer waits for, and leaves what readers still
        need; the WAL starts over at a commit after a checkpoint that got everything.
        """
        with contextlib.closing(sqlite3.connect(self.path, isolation_level=None)) as connection:
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        self.connection.close()


class _Insert:
    """An INSERT of a table's columns, with values in the form SQLAlchemy stores them."""

    def __init__(self, table: Table, on_conflict: str = "") -> None:
        self.columns = [column.name for column in table.columns]
        placeholders = ", ".join("?" for _ in self.columns)
        into = f"INTO {table.name} ({', '.join(self.columns)}) VALUES ({placeholders})"
        self.sql = f"INSERT {into} {on_conflict}".strip()
        self.sql_skipping = f"INSERT OR IGNORE {into}"
        defaults = {
            column.name: column.default.arg
            for column in table.columns
            if column.default is not None and not callable(column.default.arg)
        }
        self._defaults = [(name, defaults.get(name)) for name in self.columns]
        # values() runs for every invocation, so only the columns whose type needs it are
        # converted: timestamps to SQLAlchemy's text form, booleans to integers.
        types = [_python_type(column.type) for column in table.columns]
        self._times = [index for index, kind in enumerate(types) if kind is datetime]
        self._flags = [index for index, kind in enumerate(types) if kind is bool]

    def run(
        self,
        connection: sqlite3.Connection,
        values: list[list[Any]],
        *,
        skip_existing: bool = False,
    ) -> None:
        connection.executemany(self.sql_skipping if skip_existing else self.sql, values)

    def values(self, row: dict[str, Any]) -> list[Any]:
        get = row.get
        values = [get(name, default) for name, default in self._defaults]
        for index in self._times:
            value = values[index]
            if value is not None:
                values[index] = _time_text(value)
        for index in self._flags:
            value = values[index]
            if value is not None:
                values[index] = int(value)
        return values


def _hours_of(usage: _Insert, values: list[list[Any]]) -> list[dict[str, Any]]:
    """The late-hour rows for usage records given as stored values."""
    at = {name: index for index, name in enumerate(usage.columns)}
    return recorder.late_hour_rows(
        [
            {
                "tenant_id": row[at["tenant_id"]],
                "function_id": row[at["function_id"]],
                "recorded_at": datetime.strptime(row[at["recorded_at"]], SQLITE_TIME).replace(
                    tzinfo=UTC
                ),
            }
            for row in values
        ]
    )


def _python_type(kind: TypeEngine[Any]) -> type:
    if isinstance(kind, TypeDecorator):
        kind = kind.impl_instance
    return kind.python_type


def _time_text(value: datetime) -> str:
    """A timestamp as SQLAlchemy stores it in SQLite (SQLITE_TIME), in UTC."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
