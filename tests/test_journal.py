"""The SQLite invocation journal: what a killed API process had not committed yet is recovered.

On SQLite an invocation's rows are appended to the process's journal before its caller is
answered and committed right after. These tests leave journal files behind as a killed process
would, start `lambent serve` on the same data directory, and look at what it makes of them.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app.invocations.journal import Journal
from app.invocations.writer import SqliteRows
from tests.support import Server, Tenant, create_tenant, start_server

ADMIN = f"lmbop_journal_{uuid.uuid4().hex}"
HANDLER = "def handler(event, context):\n    return event\n"


def _rows(tenant: Tenant, function_id: str, at: datetime) -> tuple[dict[str, Any], ...]:
    request_id = str(uuid.uuid4())
    invocation = {
        "request_id": request_id,
        "tenant_id": tenant.id,
        "function_id": function_id,
        "function_name": "fn",
        "status": "success",
        "error_type": None,
        "cold_start": False,
        "start_kind": None,
        "duration_ns": 2_500_000,
        "billed_ms": 3,
        "init_duration_ns": None,
        "memory_mb": 128,
        "max_memory_used_mb": 20,
        "instance_id": "0" * 32,
        "logs": f"START RequestId: {request_id} Version: $LATEST\n",
        "started_at": at,
        "finished_at": at,
    }
    usage = {
        "request_id": request_id,
        "tenant_id": tenant.id,
        "function_id": function_id,
        "function_name": "fn",
        "recorded_at": at,
        "requests": 1,
        "memory_mb": 128,
        "billed_ms": 3,
        "mb_ms": 384,
        "init_billed_ms": 0,
    }
    return invocation, usage


def _function_id(data: Path, name: str) -> str:
    with sqlite3.connect(data / "lambent.db") as db:
        return db.execute("SELECT id FROM functions WHERE name = ?", (name,)).fetchone()[0]


def _usage_requests(tenant: Tenant) -> int:
    response = tenant.http.get("/v1/usage")
    assert response.status_code == 200, response.text
    return int(response.json()["total"]["requests"])


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Server, Tenant, str]]:
    """A server with a tenant and an invoked function; stopped at the end whatever happens."""
    data = tmp_path / "data"
    server = start_server(data, admin_key=ADMIN)
    try:
        tenant = create_tenant(server, "journal")
        tenant.deploy("fn", HANDLER)
        assert tenant.invoke("fn", {"a": 1}).status_code == 200
        yield data, server, tenant, _function_id(data, "fn")
    finally:
        server.stop()


def test_a_dead_processs_journal_is_committed_once_at_the_next_start(
    served: tuple[Path, Server, Tenant, str],
) -> None:
    data, server, tenant, function_id = served
    answered = tenant.invoke("fn", {"b": 2})
    committed_id = answered.headers["x-request-id"]
    original = tenant.invocation(committed_id)
    before = _usage_requests(tenant)
    server.stop()
    assert not list((data / "journal").glob("*.jsonl")), "a clean stop leaves no journal"

    # What a process killed between answering and committing leaves: two invocations only in
    # its journal, and one it had committed but not yet emptied from it.
    rows = SqliteRows(str(data / "lambent.db"))
    journal = Journal(data / "journal")
    at = datetime.now(UTC) - timedelta(minutes=3)
    orphaned = [_rows(tenant, function_id, at), _rows(tenant, function_id, at)]
    for invocation, usage in orphaned:
        journal.append((rows.invocations.values(invocation), rows.usage.values(usage)))
    committed_rows = _rows(tenant, function_id, at)
    committed_rows[0]["request_id"] = committed_rows[1]["request_id"] = committed_id
    journal.append(
        (rows.invocations.values(committed_rows[0]), rows.usage.values(committed_rows[1]))
    )
    journal._fd, fd = -1, journal._fd
    os.close(fd)  # the process dies: its lock goes, the file stays
    rows.close()

    restarted = start_server(data, admin_key=ADMIN)
    try:
        tenant.http = restarted.client(tenant.key)
        for invocation, _ in orphaned:
            record = tenant.invocation(invocation["request_id"])
            assert record["status"] == "success"
            assert record["billed_duration_ms"] == 3
        # The one committed already is counted once, and keeps what was committed.
        assert tenant.invocation(committed_id) == original
        assert _usage_requests(tenant) == before + 2
        assert not journal.path.exists(), "a recovered journal is removed"
        assert len(list((data / "journal").glob("*.jsonl"))) == 1  # the new process's own
    finally:
        restarted.stop()


def test_a_live_processs_journal_is_left_alone(
    served: tuple[Path, Server, Tenant, str],
) -> None:
    data, server, tenant, function_id = served
    server.stop()
    rows = SqliteRows(str(data / "lambent.db"))
    journal = Journal(data / "journal")  # held by this test process, alive
    invocation, usage = _rows(tenant, function_id, datetime.now(UTC))
    journal.append((rows.invocations.values(invocation), rows.usage.values(usage)))
    rows.close()
    try:
        restarted = start_server(data, admin_key=ADMIN)
        try:
            tenant.http = restarted.client(tenant.key)
            response = tenant.http.get(f"/v1/invocations/{invocation['request_id']}")
            assert response.status_code == 404
            assert journal.path.exists()
        finally:
            restarted.stop()
    finally:
        fcntl.flock(journal._fd, fcntl.LOCK_UN)
        journal.close(committed=False)
