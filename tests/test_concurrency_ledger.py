"""Concurrency limits across API processes, through the registry of API processes and the ledger.

The first tests drive registries and schedulers of several API processes inside one test
process, on real SQLite and PostgreSQL databases, calling each heartbeat by hand so that the
order of events is the test's. The last ones run `lambent serve` itself.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import pytest
from sqlalchemy import func, select, update

from app.db import Database, utcnow
from app.migrate import upgrade_to_head
from app.platform import Platform
from app.scheduler.ledger import SlotState
from app.scheduler.models import ApiProcess, ConcurrencyLease
from app.scheduler.processes import ApiProcessRegistry
from app.scheduler.service import Peers, Scheduler
from app.settings import Settings, async_database_url
from tests.conftest import ADMIN_KEY, postgres_base_url, with_database
from tests.support import (
    Server,
    Tenant,
    create_tenant,
    start_server,
    start_worker,
)

DEAD_AFTER_S = 1.0
TENANT = "t" * 32


async def _admin_sql(statement: str) -> None:
    connection = await asyncpg.connect(postgres_base_url())
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database of this test's own: no other API process is registered in it."""
    if request.param == "sqlite":
        url = async_database_url(f"sqlite:///{tmp_path / 'lambent.db'}")
        upgrade_to_head(url)
        yield url
        return
    name = f"lambent_ledger_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin_sql(f'CREATE DATABASE "{name}"'))
    try:
        url = async_database_url(with_database(postgres_base_url(), name))
        upgrade_to_head(url)
        yield url
    finally:
        asyncio.run(_admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class ApiProcessUnderTest:
    """The parts of one API process that concurrency admission uses; its heartbeat by hand."""

    def __init__(self, database_url: str, data_dir: Path) -> None:
        self.settings = Settings(
            data_dir=data_dir,
            database_url=database_url,
            heartbeat_s=3600,  # beat() is called by the test
            api_dead_after_s=DEAD_AFTER_S,
        )
        self.db = Database(database_url)
        self.scheduler = Scheduler([], keepalive_s=300)
        # The registry reads settings, the database and the scheduler, nothing else.
        platform = cast(Any, Platform)(
            settings=self.settings,
            db=self.db,
            store=None,
            scheduler=self.scheduler,
            worker=None,
            workers=None,
            keys=None,
            functions=None,
            metrics=None,
        )
        self.registry = ApiProcessRegistry(platform)
        self.ledger = self.scheduler.ledger

    async def start(self) -> ApiProcessUnderTest:
        await self.registry.start()
        return self

    async def close(self) -> None:
        await self.registry.close()
        await self.db.dispose()

    async def admit(self, function_id: str = "f", *, limit: int, reserved: bool = True) -> Any:
        return await self.ledger.admit_shared(TENANT, function_id, reserved, limit)


class Cluster:
    """API processes on one database, started one by one."""

    def __init__(self, database_url: str, tmp_path: Path) -> None:
        self.database_url = database_url
        self.tmp_path = tmp_path
        self.processes: list[ApiProcessUnderTest] = []

    async def start(self) -> ApiProcessUnderTest:
        data_dir = self.tmp_path / f"p{len(self.processes)}"
        process = await ApiProcessUnderTest(self.database_url, data_dir).start()
        self.processes.append(process)
        return process

    async def stop(self, process: ApiProcessUnderTest) -> None:
        self.processes.remove(process)
        await process.close()

    async def close(self) -> None:
        for process in list(self.processes):
            await self.stop(process)


def run(database_url: str, tmp_path: Path, scenario: Callable[[Cluster], Awaitable[None]]) -> None:
    async def main() -> None:
        cluster = Cluster(database_url, tmp_path)
        try:
            await scenario(cluster)
        finally:
            await cluster.close()

    asyncio.run(main())


async def lease_rows(db: Database) -> list[tuple[str, int]]:
    async with db.sessionmaker() as session:
        rows = await session.execute(select(ConcurrencyLease.process_id, ConcurrencyLease.seq))
    return sorted((process_id, seq) for process_id, seq in rows.all())


def test_a_lone_api_process_counts_in_memory_and_writes_no_lease(
    database_url: str, tmp_path: Path
) -> None:
    async def scenario(cluster: Cluster) -> None:
        alone = await cluster.start()

        slot = alone.ledger.admit(TENANT, "f", True, 1)

        assert alone.ledger.shared is False
        assert slot is not None and slot.state is SlotState.LOCAL
        assert alone.ledger.admit(TENANT, "f", True, 1) is None
        assert await lease_rows(alone.db) == []

    run(database_url, tmp_path, scenario)


def test_reserved_concurrency_holds_across_api_processes(database_url: str, tmp_path: Path) -> None:
    async def scenario(cluster: Cluster) -> None:
        first = await cluster.start()
        second = await cluster.start()
        await first.registry.beat()  # sees the second, and shares

        one = await first.admit(limit=2)
        two = await second.admit(limit=2)
        third = await second.admit(limit=2)

        assert first.ledger.shared and second.ledger.shared
        assert one is not None and two is not None
        assert third is None
        assert len(await lease_rows(first.db)) == 2

        await first.ledger.release_leased(one)
        assert await second.admit(limit=2) is not None
        assert len(await lease_rows(first.db)) == 2

    run(database_url, tmp_path, scenario)


def test_the_tenant_limit_counts_unreserved_invocations_of_every_function(
    database_url: str, tmp_path: Path
) -> None:
    async def scenario(cluster: Cluster) -> None:
        first = await cluster.start()
        second = await cluster.start()
        await first.registry.beat()

        assert await first.admit("f", limit=2, reserved=False) is not None
        assert await second.admit("g", limit=2, reserved=False) is not None
        # A reserved function's invocations do not take from the tenant's unreserved rest.
        assert await second.admit("r", limit=5, reserved=True) is not None

        assert await second.admit("h", limit=2, reserved=False) is None
        assert await first.admit("r", limit=1, reserved=True) is None

    run(database_url, tmp_path, scenario)


def test_a_process_that_starts_sharing_leases_what_it_has_in_flight(
    database_url: str, tmp_path: Path
) -> None:
    async def scenario(cluster: Cluster) -> None:
        first = await cluster.start()
        running = [first.ledger.admit(TENANT, "f", True, 2) for _ in range(2)]
        assert await lease_rows(first.db) == []
        second = await cluster.start()

        # The first process's invocations are not in the table yet: the second waits for it.
        waiting = asyncio.create_task(second.admit(limit=2))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await first.registry.beat()

        assert await asyncio.wait_for(waiting, 5) is None  # throttled: two are in flight
        assert [seq for _, seq in await lease_rows(first.db)] == sorted(s.seq for s in running if s)
        for slot in running:
            assert slot is not None and slot.state is SlotState.LEASED
            await first.ledger.release_leased(slot)
        assert await lease_rows(first.db) == []
        assert await second.admit(limit=2) is not None

    run(database_url, tmp_path, scenario)


def test_leases_of_a_process_that_stopped_heartbeating_stop_counting(
    database_url: str, tmp_path: Path
) -> None:
    async def scenario(cluster: Cluster) -> None:
        survivor = await cluster.start()
        vanished = await cluster.start()
        await survivor.registry.beat()
        assert await vanished.admit(limit=1) is not None
        assert await survivor.admit(limit=1) is None

        # The vanished process beats no more; once it is silent past the dead-after, its lease
        # no longer counts, and the survivor's next beat removes it.
        await asyncio.sleep(DEAD_AFTER_S * 0.6)
        await survivor.registry.beat()
        assert survivor.ledger.shared
        await asyncio.sleep(DEAD_AFTER_S * 0.6)
        admitted = await survivor.admit(limit=1)
        await survivor.registry.beat()

        assert admitted is not None
        assert [process_id for process_id, _ in await lease_rows(survivor.db)] == [
            survivor.registry.id
        ]
        assert survivor.ledger.shared is False
        async with survivor.db.sessionmaker() as session:
            ids = (await session.scalars(select(ApiProcess.id))).all()
        assert ids == [survivor.registry.id]

    run(database_url, tmp_path, scenario)


def test_a_process_taken_for_dead_registers_again_with_its_leases(
    database_url: str, tmp_path: Path
) -> None:
    async def scenario(cluster: Cluster) -> None:
        first = await cluster.start()
        stalled = await cluster.start()
        await first.registry.beat()
        held = await stalled.admit(limit=1)
        assert held is not None
        async with first.db.engine.begin() as connection:
            await connection.execute(
                update(ApiProcess)
                .where(ApiProcess.id == stalled.registry.id)
                .values(last_seen_at=utcnow().replace(year=2000))
            )
        await first.registry.beat()  # drops the stalled process and its lease
        assert await lease_rows(first.db) == []

        await stalled.registry.beat()
        await first.registry.beat()

        assert [seq for _, seq in await lease_rows(first.db)] == [held.seq]
        assert await first.admit(limit=1) is None

    run(database_url, tmp_path, scenario)


def test_a_process_left_alone_counts_in_memory_again_and_still_releases_its_leases(
    database_url: str, tmp_path: Path
) -> None:
    async def scenario(cluster: Cluster) -> None:
        staying = await cluster.start()
        leaving = await cluster.start()
        await staying.registry.beat()
        held = await staying.admit(limit=3)
        assert held is not None and held.state is SlotState.LEASED

        await cluster.stop(leaving)
        await staying.registry.beat()

        assert staying.ledger.shared is False
        assert staying.scheduler.peers == Peers()
        local = staying.ledger.admit(TENANT, "f", True, 3)
        assert local is not None and local.state is SlotState.LOCAL
        await staying.ledger.release_leased(held)
        assert await lease_rows(staying.db) == []

    run(database_url, tmp_path, scenario)


def test_concurrent_admissions_through_two_processes_never_pass_the_limit(
    database_url: str, tmp_path: Path
) -> None:
    async def scenario(cluster: Cluster) -> None:
        first = await cluster.start()
        second = await cluster.start()
        await first.registry.beat()

        slots = await asyncio.gather(*(p.admit(limit=3) for p in [first, second] * 8))

        assert sum(slot is not None for slot in slots) == 3
        async with first.db.sessionmaker() as session:
            assert await session.scalar(select(func.count()).select_from(ConcurrencyLease)) == 3

    run(database_url, tmp_path, scenario)


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7, 10])
def test_provisioned_concurrency_divides_into_shares_that_add_up(count: int) -> None:
    scheduler = Scheduler([], keepalive_s=300)
    for processes in (1, 2, 3, 4):
        for function_id in ("a" * 32, "b" * 32, uuid.uuid4().hex):
            shares = []
            for index in range(processes):
                scheduler.peers = Peers(index=index, count=processes)
                shares.append(scheduler.provisioned_share(function_id, count))

            assert sum(shares) == count
            assert max(shares) - min(shares) <= 1


def test_functions_of_one_provisioned_instance_spread_over_the_processes() -> None:
    scheduler = Scheduler([], keepalive_s=300)
    kept = []
    for index in range(3):
        scheduler.peers = Peers(index=index, count=3)
        kept.append(sum(scheduler.provisioned_share(f"fn{n:030d}", 1) for n in range(30)))

    assert sum(kept) == 30
    assert min(kept) >= 5


# `lambent serve` itself.

SLEEPER = """
import time

def handler(event, context):
    time.sleep(event.get("sleep", 0))
    return {}
"""


def sqlite_rows(server: Server, query: str) -> list[tuple[Any, ...]]:
    connection = sqlite3.connect(server.data_dir / "lambent.db", timeout=10)
    try:
        return connection.execute(query).fetchall()
    finally:
        connection.close()


def wait_for(predicate: Any, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def busy_instances(tenant: Tenant, name: str) -> int:
    listed = tenant.http.get(f"/v1/functions/{name}/instances").json()["instances"]
    return sum(instance["state"] == "busy" for instance in listed)


def test_a_single_api_process_writes_no_lease_while_it_invokes(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", admin_key=ADMIN_KEY)
    tenant = create_tenant(server)
    try:
        tenant.deploy("alone", SLEEPER, timeout_s=10)
        with ThreadPoolExecutor(2) as pool:
            running = [pool.submit(tenant.invoke, "alone", {"sleep": 2}) for _ in range(2)]
            wait_for(lambda: busy_instances(tenant, "alone") == 2)
            leases = sqlite_rows(server, "SELECT count(*) FROM concurrency_leases")
            registered = sqlite_rows(server, "SELECT shared FROM api_processes")
            assert [r.result().status_code for r in running] == [200, 200]
    finally:
        tenant.http.close()
        server.stop()

    assert leases == [(0,)]
    assert registered == [(0,)]


@pytest.fixture
def two_processes(tmp_path: Path) -> Iterator[Server]:
    """`lambent serve --workers 2` on SQLite, with one remote worker."""
    token = f"wt_{uuid.uuid4().hex}"
    server = start_server(
        tmp_path / "data",
        admin_key=ADMIN_KEY,
        env={
            "LAMBENT_API_WORKERS": "2",
            "LAMBENT_EMBEDDED_WORKER": "false",
            "LAMBENT_WORKER_TOKEN": token,
        },
    )
    worker = None
    try:
        wait_for(lambda: server.log().count("lambent ready") == 2)
        worker = start_worker(server, tmp_path / "worker", token, worker_id="sqlite-w")
        # Each process learns of the worker from the database within a heartbeat or two.
        time.sleep(2)
        yield server
    finally:
        if worker is not None:
            worker.stop()
        server.stop()


def connection_of_each_process(
    server: Server, tenant: Tenant, name: str, clients: list[httpx.Client]
) -> dict[str, httpx.Client]:
    """One keep-alive connection to each of the processes, found by the lease of an invocation
    through it (with reserved concurrency 1, only one lease is ever in the table)."""
    found: dict[str, httpx.Client] = {}
    for client in clients:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(
                client.post, f"/v1/functions/{name}/invocations", json={"sleep": 0.5}
            )
            [(process_id,)] = wait_for(
                lambda: sqlite_rows(server, "SELECT process_id FROM concurrency_leases")
            )
            assert running.result().status_code == 200, running.result().text
        found.setdefault(process_id, client)
        if len(found) == 2:
            return found
    raise AssertionError("every connection reached the same API process")


def test_reserved_concurrency_holds_across_the_processes_of_lambent_serve_on_sqlite(
    two_processes: Server,
) -> None:
    server = two_processes
    tenant = create_tenant(server)
    tenant.deploy("gate", SLEEPER, timeout_s=10)
    response = tenant.http.put("/v1/functions/gate/concurrency", json={"reserved_concurrency": 1})
    assert response.status_code == 200, response.text
    assert sqlite_rows(server, "SELECT shared FROM api_processes") == [(1,), (1,)]
    clients = [server.client(tenant.key) for _ in range(16)]
    try:
        first, second = connection_of_each_process(server, tenant, "gate", clients).values()
        with ThreadPoolExecutor(1) as pool:
            holding = pool.submit(first.post, "/v1/functions/gate/invocations", json={"sleep": 2})
            wait_for(lambda: sqlite_rows(server, "SELECT count(*) FROM concurrency_leases")[0][0])

            throttled = second.post("/v1/functions/gate/invocations", json={})

            assert holding.result().status_code == 200
        assert throttled.status_code == 429, throttled.text
        assert throttled.json()["type"] == "TooManyRequestsException"
        assert throttled.headers["retry-after"] == "1"
        assert second.post("/v1/functions/gate/invocations", json={}).status_code == 200
        assert sqlite_rows(server, "SELECT count(*) FROM concurrency_leases") == [(0,)]
    finally:
        for client in clients:
            client.close()
        tenant.http.close()
