"""Builders for metering and billing tests: usage written straight into a database.

Usage in past periods cannot come from invoking functions now, so tests write usage records
(with their invocation rows) into the database a server uses, the way a late-arriving record
would be written: with a mark that makes the rollup job recompute its minute.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import insert

from app.db import Database
from app.invocations.models import Invocation
from app.metering.models import UsageRecord
from app.metering.recorder import mark_late
from app.settings import async_database_url
from tests.support import Server

T = TypeVar("T")


def database_url(server: Server, request: pytest.FixtureRequest) -> str:
    """The database a test server runs on."""
    if server.database == "postgresql":
        return request.getfixturevalue("postgres_database")
    return f"sqlite:///{server.data_dir / 'lambent.db'}"


def with_db(url: str, action: Callable[[Database], Awaitable[T]]) -> T:
    async def run() -> T:
        db = Database(async_database_url(url))
        try:
            return await action(db)
        finally:
            await db.dispose()

    return asyncio.run(run())


def usage_row(
    tenant_id: str,
    function: str,
    at: datetime,
    *,
    billed_ms: int,
    memory_mb: int = 1024,
    init_billed_ms: int = 0,
    function_id: str | None = None,
) -> dict[str, Any]:
    return {
        "request_id": str(uuid.uuid4()),
        "tenant_id": tenant_id,
        "function_id": function_id or f"fn-{function}",
        "function_name": function,
        "recorded_at": at,
        "requests": 1,
        "memory_mb": memory_mb,
        "billed_ms": billed_ms,
        "mb_ms": billed_ms * memory_mb,
        "init_billed_ms": init_billed_ms,
    }


def invocation_row(usage: dict[str, Any]) -> dict[str, Any]:
    finished = usage["recorded_at"]
    return {
        "request_id": usage["request_id"],
        "tenant_id": usage["tenant_id"],
        "function_id": usage["function_id"],
        "function_name": usage["function_name"],
        "status": "success",
        "error_type": None,
        "cold_start": usage["init_billed_ms"] > 0,
        "duration_ns": usage["billed_ms"] * 1_000_000,
        "billed_ms": usage["billed_ms"],
        "init_duration_ns": usage["init_billed_ms"] * 1_000_000 or None,
        "memory_mb": usage["memory_mb"],
        "max_memory_used_mb": 10,
        "instance_id": None,
        "logs": "",
        "started_at": finished - timedelta(milliseconds=usage["billed_ms"]),
        "finished_at": finished,
    }


async def write_usage(db: Database, rows: list[dict[str, Any]], *, mark: bool = True) -> None:
    """Usage records with their invocation rows, marked (by default) for the rollup job."""
    for start in range(0, len(rows), 500):
        batch = rows[start : start + 500]
        async with db.engine.begin() as conn:
            await conn.execute(insert(Invocation), [invocation_row(r) for r in batch])
            await conn.execute(insert(UsageRecord), batch)
            if mark:
                await mark_late(conn, batch)


def insert_usage(url: str, rows: list[dict[str, Any]]) -> None:
    with_db(url, lambda db: write_usage(db, rows))


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def last_month_start(now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first - timedelta(days=1)).replace(day=1)


async def _admin_sql(url: str, statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextmanager
def fresh_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A new, migrated database of its own: SQLite in ``tmp_path``, or PostgreSQL."""
    from app.migrate import upgrade_to_head
    from tests.conftest import postgres_base_url, with_database

    if kind == "sqlite":
        tmp_path.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{tmp_path / 'billing.db'}"
        upgrade_to_head(async_database_url(url))
        yield url
        return
    base = postgres_base_url()
    name = f"lambent_billing_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin_sql(base, f'CREATE DATABASE "{name}"'))
    try:
        url = with_database(base, name)
        upgrade_to_head(async_database_url(url))
        yield url
    finally:
        asyncio.run(_admin_sql(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
