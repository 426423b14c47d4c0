"""The invoke route's two servers, and the invocation writer under SQLite lock contention.

Lambent answers ``POST /v1/functions/{name}/invocations`` ahead of FastAPI's router
(LAMBENT_INVOKE_FAST_PATH, on by default); FastAPI's route is the reference it must match. These
tests send the same requests, good and bad, to a server of each kind and compare the answers.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from app.invocations.fastpath import InvokeFastPath
from tests.support import Server, Tenant, create_tenant, start_server

ADMIN = f"lmbop_paths_{uuid.uuid4().hex}"

HANDLER = """
def handler(event, context):
    if event.get("fail"):
        raise ValueError("asked to fail")
    if event.get("big"):
        return "x" * (7 * 1024 * 1024)
    return {"echo": event}
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Server, Tenant]]]:
    """One server with the fast path and one without, each with a tenant and a function."""
    running: dict[str, tuple[Server, Tenant]] = {}
    try:
        for label, fast in (("fast", "true"), ("fastapi", "false")):
            data = tmp_path_factory.mktemp(f"invoke-{label}") / "data"
            server = start_server(data, admin_key=ADMIN, env={"LAMBENT_INVOKE_FAST_PATH": fast})
            tenant = create_tenant(server, "paths")
            tenant.deploy("fn", HANDLER)
            running[label] = (server, tenant)
        yield running
    finally:
        for server, tenant in running.values():
            tenant.http.close()
            server.stop()


def _shape(response: httpx.Response) -> dict[str, Any]:
    """What a caller sees, minus what differs between any two invocations (request ids)."""
    body: Any = response.content
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        if isinstance(body, dict):
            body.pop("requestId", None)
            for key in ("message", "errorMessage"):
                if isinstance(body.get(key), str):
                    body[key] = body[key].split("RequestId")[0]
    headers = {
        key: value
        for key, value in response.headers.items()
        if key in ("content-type", "x-function-error", "retry-after", "www-authenticate")
    }
    return {
        "status": response.status_code,
        "body": body,
        "headers": headers,
        "has_request_id": "x-request-id" in response.headers,
    }


REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("success", {"json": {"a": [1, 2, 3]}}),
    ("empty body", {"content": b""}),
    ("not json", {"content": b"{nope", "headers": {"content-type": "application/json"}}),
    ("function error", {"json": {"fail": True}}),
    ("response too large", {"json": {"big": True}}),
    ("event too large", {"content": b"[" + b"1," * (3 * 1024 * 1024) + b"1]"}),
    ("unknown function", {"json": {}, "path": "/v1/functions/nosuch/invocations"}),
    ("invalid name", {"json": {}, "path": "/v1/functions/bad.name/invocations"}),
    ("no key", {"json": {}, "headers": {"authorization": ""}}),
    ("wrong scheme", {"json": {}, "headers": {"authorization": "Basic abc"}}),
    ("unknown key", {"json": {}, "headers": {"authorization": "Bearer lmb_nosuchkey"}}),
    ("operator key", {"json": {}, "headers": {"authorization": f"Bearer {ADMIN}"}}),
    ("put is not allowed", {"method": "PUT"}),
]


@pytest.mark.parametrize("case", [name for name, _ in REQUESTS])
def test_both_invoke_routes_answer_alike(
    servers: dict[str, tuple[Server, Tenant]], case: str
) -> None:
    spec = dict(dict(REQUESTS)[case])
    path = spec.pop("path", "/v1/functions/fn/invocations")
    method = spec.pop("method", "POST")
    shapes = {}
    for label, (_, tenant) in servers.items():
        response = tenant.http.request(method, path, **spec)
        shapes[label] = _shape(response)
    assert shapes["fast"] == shapes["fastapi"]
    if case == "success":
        assert shapes["fast"]["body"] == {"echo": {"a": [1, 2, 3]}}
        assert shapes["fast"]["has_request_id"]


def test_the_fast_path_takes_invocations_and_leaves_the_rest_to_fastapi() -> None:
    """Without this, the comparison above could be FastAPI's route compared with itself."""
    passed_on: list[str] = []

    async def fastapi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        passed_on.append(f"{scope['method']} {scope['path']}")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    middleware = InvokeFastPath(fastapi, SimpleNamespace(platform=None))

    def call(method: str, path: str) -> None:
        scope = {"type": "http", "method": method, "path": path, "headers": []}
        asyncio.run(middleware(scope, receive, send))

    call("POST", "/v1/functions/fn/invocations")  # no key: the fast path answers 401 itself
    assert passed_on == []
    assert sent[0]["status"] == 401
    assert b"Unauthorized" in sent[1]["body"]

    # An unexpected failure is answered as the application's own handler answers it.
    broken = InvokeFastPath(fastapi, SimpleNamespace(platform=SimpleNamespace()))
    sent.clear()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/functions/fn/invocations",
        "headers": [(b"authorization", b"Bearer lmb_whatever")],
    }
    asyncio.run(broken(scope, receive, send))
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"]) == {
        "type": "ServiceException",
        "message": "an internal error occurred",
    }

    for method, path in (
        ("GET", "/v1/functions/fn/invocations"),
        ("POST", "/v1/functions/bad.name/invocations"),
        ("POST", "/v1/functions/fn/invocations/"),
        ("POST", "/v1/functions"),
    ):
        call(method, path)
    assert passed_on == [
        "GET /v1/functions/fn/invocations",
        "POST /v1/functions/bad.name/invocations",
        "POST /v1/functions/fn/invocations/",
        "POST /v1/functions",
    ]


def test_records_wait_out_a_held_sqlite_write_lock(tmp_path: Path) -> None:
    """An invocation whose records meet a taken write lock is answered from the journal; its
    record is committed once the lock is free, and reading it back waits for that.

    Meanwhile the server keeps serving: the writer never blocks its event loop on the lock.
    """
    server = start_server(tmp_path / "data", admin_key=ADMIN)
    try:
        tenant = create_tenant(server, "locks")
        tenant.deploy("fn", HANDLER)
        assert tenant.invoke("fn", {}).status_code == 200  # warm

        locker = sqlite3.connect(tmp_path / "data" / "lambent.db", isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        reads: list[httpx.Response] = []
        try:
            answer = tenant.invoke("fn", {"n": 1})
            assert answer.status_code == 200
            request_id = answer.headers["x-request-id"]
            with sqlite3.connect(tmp_path / "data" / "lambent.db") as reader:
                row = reader.execute(
                    "SELECT 1 FROM invocations WHERE request_id = ?", (request_id,)
                ).fetchone()
            assert row is None, "committed although the lock was held"
            reading = threading.Thread(
                target=lambda: reads.append(tenant.http.get(f"/v1/invocations/{request_id}"))
            )
            reading.start()
            time.sleep(0.5)
            assert reads == [], "read back before the record was committed"
            # The event loop is free: health checks are served meanwhile.
            assert server.client().get("/healthz").status_code == 200
        finally:
            locker.execute("COMMIT")
            locker.close()
        reading.join(timeout=30)
        assert len(reads) == 1 and reads[0].status_code == 200
        assert reads[0].json()["status"] == "success"
    finally:
        server.stop()
