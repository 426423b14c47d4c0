"""Several API processes on one PostgreSQL database: what the database must keep consistent.

Three `lambent serve` processes share a fresh database and, through the S3 store (moto), their
packages; each has its own data dir and embedded worker. Requests are spread over all three
and released together, so that they race in the database rather than in one process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
import pytest

from tests.conftest import ADMIN_KEY, _admin_sql, postgres_base_url, with_database
from tests.s3 import MotoS3
from tests.support import LAMBENT, Server, Tenant, create_tenant, make_zip, start_server

PROCESSES = 3
T = TypeVar("T")

ECHO = """
def handler(event, context):
    return {"n": event["n"], "request_id": context.aws_request_id}
"""


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """A database of this module's own, so that nothing else writes to it meanwhile."""
    base = postgres_base_url()
    name = f"lambent_concurrency_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin_sql(base, f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(base, name)
    finally:
        asyncio.run(_admin_sql(base, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def servers(
    database_url: str, moto_s3: MotoS3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Server]]:
    env = moto_s3.settings_env(moto_s3.new_bucket())
    root = tmp_path_factory.mktemp("cluster")
    # As in production: one migration run first, then the API processes.
    subprocess.run(
        [str(LAMBENT), "migrate"],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("LAMBENT_")},
            "LAMBENT_DATABASE_URL": database_url,
            "LAMBENT_DATA_DIR": str(root / "migrate"),
        },
        check=True,
        capture_output=True,
        timeout=60,
    )

    running: list[Server] = []

    def start(i: int) -> None:
        running.append(
            start_server(
                root / f"api-{i}",
                database_url=database_url,
                admin_key=ADMIN_KEY,
                env=env,
                database="postgresql",
            )
        )

    try:
        # The first process stores the operator key; the others, started together, find it.
        # (Two processes that both found none would both insert it, and one would fail.)
        start(0)
        together([lambda i=i: start(i) for i in range(1, PROCESSES)])
        yield running
    finally:
        for server in running:
            server.stop()


@pytest.fixture(scope="module")
def tenant(servers: list[Server]) -> Iterator[Tenant]:
    created = create_tenant(servers[0])
    yield created
    created.http.close()


@pytest.fixture(scope="module")
def clients(servers: list[Server], tenant: Tenant) -> Iterator[list[httpx.Client]]:
    """The tenant's client for each process."""
    opened = [server.client(tenant.key) for server in servers]
    yield opened
    for client in opened:
        client.close()


def together(calls: list[Callable[[], T]]) -> list[T]:
    """Run ``calls`` in threads released at one instant; their results in order."""
    barrier = threading.Barrier(len(calls))

    def released(call: Callable[[], T]) -> T:
        barrier.wait(timeout=30)
        return call()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(released, calls))


def test_concurrent_updates_of_different_fields_lose_none(
    tenant: Tenant, clients: list[httpx.Client]
) -> None:
    # What guarantees this: Function.revision is SQLAlchemy's version counter, so the ORM
    # writes an update as `UPDATE functions SET <the changed columns>, revision = r + 1
    # WHERE id = ... AND revision = r`, r being the revision it read. PostgreSQL makes a second
    # UPDATE of the same row wait for the first to commit and then re-evaluates its WHERE on
    # the new row (READ COMMITTED): the revision has moved on, no row matches, SQLAlchemy
    # raises StaleDataError, and app.functions.service._apply_update reads the row again and
    # retries (up to UPDATE_ATTEMPTS times, then 409 with nothing changed). So each successful
    # PATCH bumps the revision exactly once, and because only changed columns are written, a
    # retried PATCH never writes back a stale copy of another field.
    tenant.deploy("patched", ECHO)
    start_revision = clients[0].get("/v1/functions/patched").json()["revision"]
    rounds = 8
    values: dict[str, Callable[[int], Any]] = {
        "description": lambda i: f"description {i}",
        "memory_mb": lambda i: 128 + i,
        "timeout_s": lambda i: 1 + i,
        "environment": lambda i: {"ROUND": str(i)},
    }

    def writer(field: str, offset: int) -> list[tuple[Any, httpx.Response]]:
        # One writer per field, in sequence, so that each field has a well-defined last value;
        # the writers of different fields race, each round through another process.
        results = []
        for i in range(rounds):
            value = values[field](i)
            client = clients[(offset + i) % PROCESSES]
            results.append((value, client.patch("/v1/functions/patched", json={field: value})))
        return results

    outcomes = dict(
        zip(
            values,
            together([lambda f=f, n=n: writer(f, n) for n, f in enumerate(values)]),
            strict=True,
        )
    )

    successes = []
    for field, results in outcomes.items():
        for value, response in results:
            assert response.status_code in (200, 409), response.text
            if response.status_code == 200:
                assert response.json()[field] == value
                successes.append(response.json()["revision"])
    total = rounds * len(values)
    assert len(successes) >= total * 3 // 4, f"only {len(successes)} of {total} updates succeeded"
    # Each success had a revision of its own: no two updates both won from the same read.
    assert sorted(successes) == list(range(start_revision + 1, start_revision + len(successes) + 1))
    for client in clients:
        final = client.get("/v1/functions/patched").json()
        assert final["revision"] == start_revision + len(successes)
        for field, results in outcomes.items():
            last_written = [value for value, r in results if r.status_code == 200][-1]
            assert final[field] == last_written, field


def test_concurrent_invocations_through_every_process_are_each_metered_once(
    tenant: Tenant, clients: list[httpx.Client]
) -> None:
    tenant.deploy("metered", ECHO)
    per_process = 6

    responses = together(
        [
            lambda c=c, n=n: c.post("/v1/functions/metered/invocations", json={"n": n})
            for n, c in enumerate(clients * per_process)
        ]
    )

    succeeded = [r for r in responses if r.status_code == 200]
    assert len(succeeded) == len(responses), [r.text for r in responses if r.status_code != 200]
    assert all("x-function-error" not in r.headers for r in succeeded)
    request_ids = {r.headers["x-request-id"] for r in succeeded}
    assert len(request_ids) == len(succeeded)
    for client in clients:
        usage = client.get("/v1/usage").json()
        by_function = {row["function"]: row for row in usage["functions"]}
        assert by_function["metered"]["requests"] == len(succeeded)


def test_concurrent_creates_of_one_name_let_exactly_one_win(
    tenant: Tenant, clients: list[httpx.Client]
) -> None:
    package = make_zip({"app.py": ECHO})
    attempts = 3 * PROCESSES

    def create(client: httpx.Client) -> httpx.Response:
        return client.post(
            "/v1/functions",
            data={"name": "contested", "runtime": "python3.11", "handler": "app.handler"},
            files={"code": ("code.zip", package, "application/zip")},
        )

    responses = together([lambda c=c: create(c) for c in clients * (attempts // PROCESSES)])

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * (attempts - 1), [r.text for r in responses]
    assert all(
        r.json()["type"] == "ResourceConflictException" for r in responses if r.status_code == 409
    )
    # The losers put the same package and then cleaned up after themselves; the winner's code
    # must still be there, whichever process runs it.
    for n, client in enumerate(clients):
        invoked = client.post("/v1/functions/contested/invocations", json={"n": n})
        assert invoked.status_code == 200, invoked.text
        assert invoked.json()["n"] == n
