"""The SQLite writer: its own connection, the form its rows take, and when it commits them."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import create_engine, insert

from app.invocations import writer as writers
from app.invocations.models import Invocation
from app.invocations.writer import SqliteRows
from app.metering.models import UsageRecord
from app.migrate import upgrade_to_head
from app.platform import Platform
from app.settings import Settings


def _count_in_database_file(path: Path) -> int:
    # immutable=1: SQLite reads the database file alone and ignores the WAL.
    with sqlite3.connect(f"file:{path}?immutable=1", uri=True) as db:
        return db.execute("SELECT count(*) FROM invocations").fetchone()[0]


def _database(tmp_path: Path) -> Path:
    path = tmp_path / "lambent.db"
    upgrade_to_head(f"sqlite+aiosqlite:///{path}")
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
    return path


def _rows() -> tuple[dict[str, object], dict[str, object]]:
    """A new invocation's row and usage row, with only the columns that have no default."""
    request_id, now = str(uuid.uuid4()), datetime.now(UTC)
    common = {"request_id": request_id, "tenant_id": "t", "function_id": "f", "memory_mb": 128}
    invocation = {
        **common,
        "function_name": "fn",
        "status": "success",
        "cold_start": False,
        "duration_ns": 1,
        "billed_ms": 1,
        "max_memory_used_mb": 1,
        "logs": "",
        "started_at": now,
        "finished_at": now,
    }
    usage = {
        **common,
        "function_name": "fn",
        "recorded_at": now,
        "requests": 1,
        "billed_ms": 1,
        "mb_ms": 128,
        "init_billed_ms": 0,
    }
    return invocation, usage


def test_commits_stay_in_the_wal_until_checkpointed(tmp_path: Path) -> None:
    path = _database(tmp_path)
    rows = SqliteRows(str(path))
    try:
        for _ in range(300):  # a few hundred commits: past SQLite's automatic checkpoint
            invocation, _ = _rows()
            assert rows.write_entries([(rows.invocations.values(invocation), None)])

        assert _count_in_database_file(path) == 0, "a commit checkpointed on the event loop"
        rows.checkpoint()
        assert _count_in_database_file(path) == 300
    finally:
        rows.close()


def test_rows_are_stored_as_sqlalchemy_stores_them(tmp_path: Path) -> None:
    """The writer fills the tables SQLAlchemy reads everywhere else: every column it writes must
    hold exactly what an ORM insert of the same row holds."""
    path = tmp_path / "lambent.db"
    upgrade_to_head(f"sqlite+aiosqlite:///{path}")
    whole_second = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)  # no microseconds to print
    with_micros = datetime(2026, 3, 1, 11, 30, 0, 42, tzinfo=UTC)
    invocation = {
        "tenant_id": "t",
        "function_id": "f",
        "function_name": "fn",
        "status": "error",
        "error_type": "Runtime.ExitError",
        "cold_start": True,
        "start_kind": "prestarted",
        "duration_ns": 1_234_567,
        "billed_ms": 2,
        "init_duration_ns": 7_000_000,
        "memory_mb": 256,
        "max_memory_used_mb": 31,
        "instance_id": "i",
        "logs": "START ...\n\u00e9\u4e2d\n",
        "started_at": whole_second,
        "finished_at": with_micros,
    }
    usage = {
        "tenant_id": "t",
        "function_id": "f",
        "function_name": "fn",
        "recorded_at": with_micros,
        "requests": 1,
        "memory_mb": 256,
        "billed_ms": 2,
        "mb_ms": 512,
        "init_billed_ms": 7,
    }

    rows = SqliteRows(str(path))
    try:
        assert rows.write_entries(
            [
                (
                    rows.invocations.values({**invocation, "request_id": "ours"}),
                    rows.usage.values({**usage, "request_id": "ours"}),
                )
            ]
        )
    finally:
        rows.close()
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as connection:
            connection.execute(insert(Invocation), [{**invocation, "request_id": "orm"}])
            connection.execute(insert(UsageRecord), [{**usage, "request_id": "orm"}])
    finally:
        engine.dispose()

    with sqlite3.connect(path) as db:
        for table in ("invocations", "usage_records"):
            stored = {
                row[0]: row[1:]
                for row in db.execute(f"SELECT request_id, * FROM {table} ORDER BY request_id")
            }
            ours, orm = stored["ours"], stored["orm"]
            columns = [c[1] for c in db.execute(f"PRAGMA table_info({table})")]
            differing = [
                name
                for name, a, b in zip(columns, ours, orm, strict=True)
                if a != b and name not in ("request_id", "id")
            ]
            assert differing == [], f"{table}: {differing}"


def _count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_invocations_answered_together_are_committed_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer gathers what is journaled for COMMIT_DELAY_S and commits it in one
    transaction; a reader of the records does not wait for the gathering to end."""
    path = _database(tmp_path)
    # The writer reads the settings alone (the data directory, metering).
    platform = cast(Any, Platform)(
        settings=Settings(data_dir=tmp_path / "data"),
        db=None,
        store=None,
        scheduler=None,
        worker=None,
        workers=None,
        keys=None,
        functions=None,
        metrics=None,
    )

    async def scenario() -> None:
        writer = writers.SqliteWriter(platform, str(path))
        writer.start()
        try:
            # Long enough that five turns of the event loop surely fit in it.
            monkeypatch.setattr(writers, "COMMIT_DELAY_S", 0.5)
            for _ in range(5):
                await writer.write(*_rows())
                await asyncio.sleep(0)  # as between two requests: the loop runs its callbacks
            assert _count(path, "invocations") == 0, "committed before the gathering delay"
            # A timer of the same loop, due later than the writer's: the commit comes first.
            await asyncio.sleep(1.0)
            assert _count(path, "invocations") == 5
            assert _count(path, "usage_records") == 5
            assert writer._commits == 1, "five invocations, more than one transaction"

            # What a read of the records waits for commits at once: it does not wait out the
            # gathering, here made longer than the test may take.
            monkeypatch.setattr(writers, "COMMIT_DELAY_S", 3600)
            await writer.write(*_rows())
            await asyncio.wait_for(writer.settled(), timeout=30)
            assert _count(path, "invocations") == 6
            assert writer._commits == 2
        finally:
            await writer.close()

    asyncio.run(scenario())
