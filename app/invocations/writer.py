"""Writes invocation outcomes and their usage records, many per transaction.

Every invocation ends with two rows written in one transaction, before its caller is answered.
Done one by one from concurrent requests, those transactions fight for SQLite's single write
lock (its busy handler sleeps and retries, which sets the tail), and each pays the driver's
thread hand-offs alone. Here one task writes: it takes everything queued, writes it all in one
transaction, commits, and only then wakes each caller. Under load a batch holds many
invocations; alone, one invocation waits for no one. A failed batch fails each caller in it.

On SQLite the batch goes through the standard library's driver on the event loop's own thread.
An insert of two small rows and a commit (WAL, synchronous=NORMAL: no fsync) costs tens of
microseconds, less than a single hand-off to the thread of an async driver; aiosqlite made about
eight such hand-offs per batch. The connection never waits for SQLite's write lock: when another
connection holds it (a rollup, an API change), the attempt fails at once and the task retries
after a short sleep, so the loop is never blocked on a lock. When the writer task has nothing
queued and is not writing, an invocation's rows are written by its own request at once, which
spares it two hand-overs between tasks. PostgreSQL has a native async
driver and is written through SQLAlchemy.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, insert
from sqlalchemy.engine import make_url

from app.invocations.models import Invocation
from app.logging import get_logger
from app.metering import recorder
from app.metering.models import LateHour, UsageRecord
from app.platform import Platform

log = get_logger(__name__)

MAX_BATCH = 256
# How long a batch keeps retrying while other connections hold SQLite's write lock; the same
# bound as the busy timeout of every other connection.
LOCK_WAIT_S = 30.0
LOCK_RETRY_FIRST_S = 0.001
LOCK_RETRY_MAX_S = 0.05

# The invocation row, its usage row, and the future of the caller waiting for them (None when
# the caller wrote them itself).
Item = tuple[dict[str, Any], dict[str, Any], asyncio.Future[None] | None]

# The text form SQLAlchemy stores SQLite timestamps in; rollups and every query rely on it.
SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"


class InvocationWriter:
    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._busy = False  # the writer task is writing a batch
        self._sqlite: SqliteRows | None = None
        url = make_url(platform.db.url)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            self._sqlite = SqliteRows(str(url.database))

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
        if self._sqlite is not None:
            self._sqlite.close()

    async def write(self, invocation_row: dict[str, Any], usage_row: dict[str, Any]) -> None:
        """Return once both rows are committed together."""
        # Nothing to batch with: write at once, sparing the hand-over to the writer task. A
        # taken lock leaves it to that task, which waits for it without blocking anyone.
        idle = self._sqlite is not None and not self._busy and self._queue.empty()
        if idle and self._write_sqlite([(invocation_row, usage_row, None)]):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((invocation_row, usage_row, waiter))
        # Shielded: a caller that goes away must not cancel a write already under way.
        await asyncio.shield(waiter)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._busy = True
            try:
                await self._write(batch)
            except Exception as exc:  # noqa: BLE001 - each caller gets the failure instead
                log.exception("writing invocation records failed", invocations=len(batch))
                for *_, waiter in batch:
                    if waiter is not None and not waiter.done():
                        waiter.set_exception(exc)
                continue
            finally:
                self._busy = False
            for *_, waiter in batch:
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    async def _write(self, batch: list[Item]) -> None:
        invocations = [item[0] for item in batch]
        usage = [item[1] for item in batch] if self.platform.settings.metering_enabled else []
        if self._sqlite is None:
            async with self.platform.db.engine.begin() as connection:
                await connection.execute(insert(Invocation), invocations)
                await recorder.record_usage_many(self.platform, connection, usage)
            return

        deadline = time.monotonic() + LOCK_WAIT_S
        pause = LOCK_RETRY_FIRST_S
        while not self._write_sqlite(batch):
            if time.monotonic() > deadline:
                raise TimeoutError(f"SQLite's write lock stayed taken for {LOCK_WAIT_S:.0f} s")
            await asyncio.sleep(pause)
            pause = min(pause * 2, LOCK_RETRY_MAX_S)

    def _write_sqlite(self, batch: list[Item]) -> bool:
        """One attempt; False, with nothing written, when another connection holds the lock."""
        assert self._sqlite is not None
        invocations = [item[0] for item in batch]
        usage = [item[1] for item in batch] if self.platform.settings.metering_enabled else []
        late = recorder.late_hour_rows(recorder.late_records(self.platform, usage))
        if not self._sqlite.write(invocations, usage, late):
            return False
        if usage:
            recorder.note_usage(self.platform, usage)
        return True


class SqliteRows:
    """The writer's own connection to the SQLite file, through the standard library's driver."""

    def __init__(self, path: str) -> None:
        self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # The same settings as every other connection (app.db), except that a taken write lock
        # fails at once rather than blocking the event loop.
        for pragma in ("synchronous=NORMAL", "foreign_keys=ON", "busy_timeout=0"):
            self.connection.execute(f"PRAGMA {pragma}")
        self.invocations = _Insert(Invocation.__table__)  # type: ignore[arg-type]
        self.usage = _Insert(UsageRecord.__table__)  # type: ignore[arg-type]
        self.late = _Insert(LateHour.__table__, on_conflict="ON CONFLICT DO NOTHING")  # type: ignore[arg-type]

    def write(
        self,
        invocations: list[dict[str, Any]],
        usage: list[dict[str, Any]],
        late: list[dict[str, Any]],
    ) -> bool:
        """Write all rows in one transaction; False, with nothing written, if the lock is taken."""
        connection = self.connection
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                return False
            raise
        try:
            self.invocations.run(connection, invocations)
            if usage:
                self.usage.run(connection, usage)
            if late:
                self.late.run(connection, late)
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise
        return True

    def close(self) -> None:
        self.connection.close()


class _Insert:
    """An INSERT of a table's columns, with values in the form SQLAlchemy stores them."""

    def __init__(self, table: Table, on_conflict: str = "") -> None:
        self.columns = [column.name for column in table.columns]
        placeholders = ", ".join("?" for _ in self.columns)
        self.sql = (
            f"INSERT INTO {table.name} ({', '.join(self.columns)}) VALUES ({placeholders}) "
            f"{on_conflict}"
        ).strip()
        self.defaults = {
            column.name: column.default.arg
            for column in table.columns
            if column.default is not None and not callable(column.default.arg)
        }

    def run(self, connection: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
        connection.executemany(self.sql, [self._values(row) for row in rows])

    def _values(self, row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(_stored(row.get(name, self.defaults.get(name))) for name in self.columns)


def _stored(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime(SQLITE_TIME)
    if isinstance(value, bool):
        return int(value)
    return value


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
