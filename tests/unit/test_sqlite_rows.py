"""The SQLite writer's own connection: it leaves the WAL to a checkpoint run from a thread."""

from __future__ import annotations

import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path

from app.invocations.writer import SqliteRows
from app.migrate import upgrade_to_head


def _count_in_database_file(path: Path) -> int:
    # immutable=1: SQLite reads the database file alone and ignores the WAL.
    with sqlite3.connect(f"file:{path}?immutable=1", uri=True) as db:
        return db.execute("SELECT count(*) FROM invocations").fetchone()[0]


def test_commits_stay_in_the_wal_until_checkpointed(tmp_path: Path) -> None:
    path = tmp_path / "lambent.db"
    upgrade_to_head(f"sqlite+aiosqlite:///{path}")
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
    rows = SqliteRows(str(path))
    now = datetime.now(UTC)
    try:
        for _ in range(300):  # a few hundred commits: past SQLite's automatic checkpoint
            row = {
                "request_id": str(uuid.uuid4()),
                "tenant_id": "t",
                "function_id": "f",
                "function_name": "fn",
                "status": "success",
                "cold_start": False,
                "duration_ns": 1,
                "billed_ms": 1,
                "memory_mb": 128,
                "max_memory_used_mb": 1,
                "logs": "",
                "started_at": now,
                "finished_at": now,
            }
            assert rows.write_entries([(rows.invocations.values(row), None)])

        assert _count_in_database_file(path) == 0, "a commit checkpointed on the event loop"
        rows.checkpoint()
        assert _count_in_database_file(path) == 300
    finally:
        rows.close()
