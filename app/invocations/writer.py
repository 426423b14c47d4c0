"""Writes invocation outcomes and their usage records, many per transaction.

Every invocation ends with two rows written in one transaction, before its caller is answered.
Done one by one from concurrent requests, those transactions fight for SQLite's single write
lock (its busy handler sleeps and retries, which sets the tail), and each pays the driver's
thread hand-offs alone. Here one task writes: it takes everything queued, writes it all in one
transaction, commits, and only then wakes each caller. Under load a batch holds many
invocations; alone, one invocation waits for no one. A failed batch fails each caller in it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from sqlalchemy import insert

from app.invocations.models import Invocation
from app.logging import get_logger
from app.metering import recorder
from app.platform import Platform

log = get_logger(__name__)

MAX_BATCH = 256

Item = tuple[dict[str, Any], dict[str, Any], asyncio.Future[None]]


class InvocationWriter:
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
        """Return once both rows are committed together."""
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
        async with self.platform.db.engine.begin() as connection:
            await connection.execute(insert(Invocation), [item[0] for item in batch])
            await recorder.record_usage_many(self.platform, connection, [item[1] for item in batch])
