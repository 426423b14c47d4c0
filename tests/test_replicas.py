"""Several API processes serving through the same remote workers, as behind a load balancer.

Three `lambent serve` processes with no embedded worker share a PostgreSQL database and a bucket
(moto). The workers heartbeat to the first process only, as a load balancer would send each
worker's calls to one of them: the other processes learn of the workers, and of their deaths,
from the database alone. Concurrency limits and provisioned concurrency hold across the
processes, through the same database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import ADMIN_KEY, postgres_base_url, with_database
from tests.s3 import MotoS3
from tests.support import (
    LAMBENT,
    Server,
    Tenant,
    WorkerAgent,
    create_tenant,
    start_server,
    start_worker,
)

PROCESSES = 3
TOKEN = f"wt_{uuid.uuid4().hex}"
DEAD_AFTER_S = 5  # LAMBENT_WORKER_DEAD_AFTER_S's default
# A worker is declared dead within DEAD_AFTER_S of its last heartbeat, plus one read of the
# workers table (every LAMBENT_HEARTBEAT_S, 1 s) and a heartbeat interval.
DECLARED_WITHIN_S = DEAD_AFTER_S + 4

# The instance id comes from Lambda's log stream name, "$LATEST/<instance id>".
WHERE = """
import os, time

def handler(event, context):
    time.sleep(event.get("sleep", 0))
    return {"instance": os.environ["AWS_LAMBDA_LOG_STREAM_NAME"].split("/", 1)[1]}
"""


# Each invocation says when the handler ran, to tell how many ran at once.
TIMED = """
import time

def handler(event, context):
    start = time.time()
    time.sleep(event.get("sleep", 0))
    return {"start": start, "end": time.time()}
"""


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def listed(api: Server) -> dict[str, dict[str, Any]]:
    with api.admin() as admin:
        response = admin.get("/v1/workers")
    assert response.status_code == 200, response.text
    return {w["id"]: w for w in response.json()["workers"]}


def statuses(apis: list[Server], worker_id: str) -> list[str | None]:
    return [listed(api).get(worker_id, {}).get("status") for api in apis]


def instance_worker(tenant: Tenant, api: Server, name: str, instance_id: str) -> str:
    with api.client(tenant.key) as client:
        response = client.get(f"/v1/functions/{name}/instances")
    assert response.status_code == 200, response.text
    [worker] = [i["worker"] for i in response.json()["instances"] if i["id"] == instance_id]
    return worker


def invoke(tenant: Tenant, api: Server, name: str, event: Any = None) -> httpx.Response:
    with api.client(tenant.key) as client:
        return client.post(f"/v1/functions/{name}/invocations", json=event or {})


def cold_start(tenant: Tenant, response: httpx.Response) -> bool:
    return tenant.invocation(response.headers["x-request-id"])["cold_start"]


@pytest.fixture(scope="module")
def server_env(moto_s3: MotoS3) -> dict[str, str]:
    return {
        **moto_s3.settings_env(moto_s3.new_bucket()),
        "LAMBENT_WORKER_TOKEN": TOKEN,
        "LAMBENT_EMBEDDED_WORKER": "false",
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("replicas")


def start_api(root: Path, n: int, database_url: str, env: dict[str, str], **kw: Any) -> Server:
    return start_server(
        root / f"api-{n}",
        database_url=database_url,
        admin_key=ADMIN_KEY,
        env=env,
        database="postgresql",
        **kw,
    )


def sql(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    async def fetch() -> list[asyncpg.Record]:
        connection = await asyncpg.connect(database_url)
        try:
            return await connection.fetch(query, *args)
        finally:
            await connection.close()

    return asyncio.run(fetch())


@pytest.fixture(scope="module")
def replica_database() -> Iterator[str]:
    """A database of this module's own: the API processes of other tests' servers would count
    among the live ones, and take a share of provisioned concurrency."""
    name = f"lambent_replicas_{uuid.uuid4().hex[:10]}"
    sql(postgres_base_url(), f'CREATE DATABASE "{name}"')
    try:
        yield with_database(postgres_base_url(), name)
    finally:
        sql(postgres_base_url(), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def apis(root: Path, replica_database: str, server_env: dict[str, str]) -> Iterator[list[Server]]:
    # As in production: one migration run, then the API processes.
    subprocess.run(
        [str(LAMBENT), "migrate"],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("LAMBENT_")},
            "LAMBENT_DATABASE_URL": replica_database,
            "LAMBENT_DATA_DIR": str(root / "migrate"),
        },
        check=True,
        capture_output=True,
        timeout=60,
    )
    running: list[Server] = []
    try:
        with ThreadPoolExecutor(PROCESSES) as pool:
            starting = [
                pool.submit(start_api, root, n, replica_database, server_env)
                for n in range(PROCESSES)
            ]
            running.extend(future.result() for future in starting)
        yield running
    finally:
        for api in running:
            api.stop()


def start_agent(root: Path, api: Server, host: str, memory_mb: int = 1024) -> WorkerAgent:
    worker_id = f"replica-w-{uuid.uuid4().hex[:6]}"
    return start_worker(
        api, root / worker_id, TOKEN, worker_id=worker_id, host=host, memory_mb=memory_mb
    )


@pytest.fixture(scope="module")
def workers(root: Path, apis: list[Server]) -> Iterator[list[WorkerAgent]]:
    """Two workers of 1,024 MB whose control plane URL is the first API process's."""
    started: list[WorkerAgent] = []
    try:
        with ThreadPoolExecutor(2) as pool:
            starting = [
                pool.submit(start_agent, root, apis[0], f"127.0.0.{20 + n}") for n in (1, 2)
            ]
            started.extend(future.result() for future in starting)
        yield started
    finally:
        for worker in started:
            worker.stop()


@pytest.fixture(scope="module")
def tenant(apis: list[Server], workers: list[WorkerAgent]) -> Iterator[Tenant]:
    created = create_tenant(apis[0])
    yield created
    created.http.close()


@pytest.fixture
def victim(root: Path, apis: list[Server], workers: list[WorkerAgent]) -> Iterator[WorkerAgent]:
    """A third worker, with more memory than the others so that new instances land on it."""
    agent = start_agent(root, apis[0], "127.0.0.29", memory_mb=4096)
    wait_for(lambda: statuses(apis, agent.id) == ["healthy"] * PROCESSES)
    yield agent
    agent.stop()
    # What an operator does with a dead worker; every API process then drops it.
    with apis[1].admin() as admin:
        admin.delete(f"/v1/workers/{agent.id}")
    wait_for(lambda: statuses(apis, agent.id) == [None] * PROCESSES)


def in_background(call: Callable[[], httpx.Response]) -> Future[httpx.Response]:
    pool = ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def test_every_api_process_lists_the_workers_that_heartbeat_to_one_of_them(
    apis: list[Server], workers: list[WorkerAgent]
) -> None:
    for worker in workers:
        wait_for(lambda w=worker: statuses(apis, w.id) == ["healthy"] * PROCESSES, timeout_s=5)
    far = apis[-1]  # receives no heartbeat itself
    first = listed(far)[workers[0].id]

    later = wait_for(
        lambda: (
            (w := listed(far)[workers[0].id])["last_heartbeat_at"] != first["last_heartbeat_at"]
            and w
        ),
        timeout_s=5,
    )

    assert later["last_heartbeat_at"] > first["last_heartbeat_at"]
    assert later["capacity_mb"] == 1024
    assert later["address"] == workers[0].address
    assert later["used_mb"] + later["free_mb"] == 1024


def test_every_api_process_invokes_through_the_shared_workers(
    apis: list[Server], workers: list[WorkerAgent], tenant: Tenant
) -> None:
    tenant.deploy("shared", WHERE)

    responses = [invoke(tenant, api, "shared") for api in apis]

    assert [r.status_code for r in responses] == [200] * PROCESSES, [r.text for r in responses]
    for api, response in zip(apis, responses, strict=True):
        worker = instance_worker(tenant, api, "shared", response.json()["instance"])
        assert worker in {w.id for w in workers}


def test_a_restarted_api_process_leaves_the_other_processes_warm_instances_alone(
    root: Path,
    apis: list[Server],
    workers: list[WorkerAgent],
    tenant: Tenant,
    replica_database: str,
    server_env: dict[str, str],
) -> None:
    tenant.deploy("steady", WHERE)
    steady, crashing = apis[1], apis[2]
    warm = invoke(tenant, steady, "steady")
    assert warm.status_code == 200, warm.text
    assert invoke(tenant, crashing, "steady").status_code == 200

    crashing.process.kill()
    crashing.process.wait()
    port = int(crashing.base_url.rsplit(":", 1)[1])
    apis[2] = start_api(root, 2, replica_database, server_env, port=port)

    assert [listed(apis[2])[w.id]["status"] for w in workers] == ["healthy"] * 2
    again = invoke(tenant, steady, "steady")
    assert again.status_code == 200, again.text
    assert again.json()["instance"] == warm.json()["instance"]
    assert cold_start(tenant, again) is False
    assert invoke(tenant, apis[2], "steady").status_code == 200


def test_a_killed_worker_is_declared_dead_by_every_api_process_which_serve_on(
    apis: list[Server], workers: list[WorkerAgent], tenant: Tenant, victim: WorkerAgent
) -> None:
    tenant.deploy("survivor", WHERE)
    for api in apis:
        response = invoke(tenant, api, "survivor")
        assert response.status_code == 200, response.text
        assert instance_worker(tenant, api, "survivor", response.json()["instance"]) == victim.id

    victim.kill()
    killed_at = time.monotonic()
    wait_for(lambda: statuses(apis, victim.id) == ["dead"] * PROCESSES, timeout_s=15)
    declared_s = time.monotonic() - killed_at

    assert declared_s < DECLARED_WITHIN_S
    survivors = {w.id for w in workers}
    for api in apis:
        response = invoke(tenant, api, "survivor")
        assert response.status_code == 200, response.text
        assert instance_worker(tenant, api, "survivor", response.json()["instance"]) in survivors


def test_a_worker_that_stops_answering_fails_the_calls_of_a_process_it_never_heartbeat_to(
    apis: list[Server], tenant: Tenant, victim: WorkerAgent
) -> None:
    # SIGSTOP keeps the connections open: only the heartbeats missing from the database tell
    # the last API process, which never received one, that the worker is gone.
    tenant.deploy("stranded", WHERE, timeout_s=60)
    far = apis[-1]
    pending = in_background(lambda: invoke(tenant, far, "stranded", {"sleep": 12}))
    wait_for(lambda: listed(far)[victim.id]["instances"]["busy"] == 1)

    victim.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    response = pending.result(timeout=30)
    answered_s = time.monotonic() - stopped_at

    assert response.status_code == 502, response.text
    assert response.json()["type"] == "WorkerLostException"
    assert DEAD_AFTER_S - 1 < answered_s < DECLARED_WITHIN_S
    wait_for(lambda: statuses(apis, victim.id) == ["dead"] * PROCESSES, timeout_s=3)
    victim.signal(signal.SIGCONT)


def test_lambent_serve_with_two_processes_serves_invocations(
    root: Path,
    replica_database: str,
    server_env: dict[str, str],
    workers: list[WorkerAgent],
    tenant: Tenant,
) -> None:
    api = start_api(root, PROCESSES, replica_database, {**server_env, "LAMBENT_API_WORKERS": "2"})
    try:
        wait_for(lambda: api.log().count("lambent ready") == 2)
        tenant.deploy("forked", WHERE)

        responses = [invoke(tenant, api, "forked") for _ in range(4)]

        assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
        assert [listed(api)[w.id]["status"] for w in workers] == ["healthy"] * 2
    finally:
        api.stop()


def test_lambent_serve_refuses_several_processes_with_an_embedded_worker(root: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBENT_")}
    env["LAMBENT_DATA_DIR"] = str(root / "refused")

    refused = subprocess.run(
        [str(LAMBENT), "serve", "--workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert refused.returncode == 2
    assert "LAMBENT_EMBEDDED_WORKER=false" in refused.stderr


# Concurrency limits and provisioned concurrency hold across the API processes.


def burst(tenant: Tenant, apis: list[Server], name: str, clients: int) -> list[httpx.Response]:
    """``clients`` invocations released at one instant, spread evenly over the processes."""
    barrier = threading.Barrier(clients)

    def call(n: int) -> httpx.Response:
        with apis[n % len(apis)].client(tenant.key) as client:
            barrier.wait(timeout=30)
            return client.post(f"/v1/functions/{name}/invocations", json={"sleep": 1})

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(call, range(clients)))


def most_at_once(responses: list[httpx.Response]) -> int:
    edges = sorted(
        edge
        for r in responses
        if r.status_code == 200
        for edge in ((r.json()["start"], 1), (r.json()["end"], -1))
    )
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def assert_throttled(responses: list[httpx.Response], limit: int) -> None:
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, [r.text for r in responses]
    assert codes.count(200) >= limit
    # Without a shared count each process would admit up to the limit: three times as many.
    assert most_at_once(responses) <= limit
    for throttled in (r for r in responses if r.status_code == 429):
        assert throttled.json()["type"] == "TooManyRequestsException"
        assert throttled.headers["retry-after"] == "1"


def test_reserved_concurrency_holds_across_the_api_processes(
    apis: list[Server], workers: list[WorkerAgent], tenant: Tenant
) -> None:
    tenant.deploy("reserved-two", TIMED, timeout_s=10)
    response = tenant.http.put(
        "/v1/functions/reserved-two/concurrency", json={"reserved_concurrency": 2}
    )
    assert response.status_code == 200, response.text

    responses = burst(tenant, apis, "reserved-two", 12)

    assert_throttled(responses, 2)
    assert [r.status_code for r in responses].count(429) >= 6


def test_the_tenant_limit_holds_across_the_api_processes(
    apis: list[Server], workers: list[WorkerAgent]
) -> None:
    limited = create_tenant(apis[0])
    try:
        with apis[0].admin() as admin:
            response = admin.patch(f"/v1/tenants/{limited.id}", json={"concurrency_limit": 2})
        assert response.status_code == 200, response.text
        limited.deploy("unreserved", TIMED, timeout_s=10)

        responses = burst(limited, apis, "unreserved", 12)

        assert_throttled(responses, 2)
        assert [r.status_code for r in responses].count(429) >= 6
    finally:
        limited.http.close()


def test_provisioned_concurrency_is_divided_among_the_api_processes(
    apis: list[Server], workers: list[WorkerAgent], tenant: Tenant
) -> None:
    tenant.deploy("divided", WHERE)

    response = tenant.http.put(
        "/v1/functions/divided/provisioned-concurrency", json={"provisioned_concurrency": 3}
    )
    assert response.status_code == 200, response.text

    def listing(api: Server) -> list[dict[str, Any]]:
        with api.client(tenant.key) as client:
            return client.get("/v1/functions/divided/instances").json()["instances"]

    def status(api: Server) -> dict[str, Any]:
        with api.client(tenant.key) as client:
            return client.get("/v1/functions/divided/provisioned-concurrency").json()

    try:
        wait_for(lambda: all(status(api)["status"] == "READY" for api in apis), timeout_s=20)
        time.sleep(3)  # a few more rounds of every process: none starts more

        assert len(listing(apis[-1])) == 3
        # Each process marks the instances it keeps; one each.
        assert [sum(i["provisioned"] for i in listing(api)) for api in apis] == [1, 1, 1]
        assert {status(api)["ready"] for api in apis} == {3}
    finally:
        tenant.http.delete("/v1/functions/divided/provisioned-concurrency")


def test_the_leases_of_a_killed_api_process_stop_counting(
    root: Path,
    apis: list[Server],
    workers: list[WorkerAgent],
    tenant: Tenant,
    replica_database: str,
    server_env: dict[str, str],
) -> None:
    tenant.deploy("held", TIMED, timeout_s=60)
    tenant.http.put("/v1/functions/held/concurrency", json={"reserved_concurrency": 1})
    doomed = start_api(root, PROCESSES + 1, replica_database, server_env)
    try:
        holding = in_background(lambda: invoke(tenant, doomed, "held", {"sleep": 15}))
        [lease] = wait_for(lambda: sql(replica_database, "SELECT * FROM concurrency_leases"))
        assert invoke(tenant, apis[0], "held").status_code == 429

        doomed.process.kill()
        doomed.process.wait()
        killed_at = time.monotonic()
        wait_for(lambda: invoke(tenant, apis[0], "held").status_code == 200, timeout_s=20)
        freed_s = time.monotonic() - killed_at

        assert freed_s < DECLARED_WITHIN_S
        with pytest.raises(httpx.HTTPError):
            holding.result(timeout=10)
        wait_for(
            lambda: (
                not sql(
                    replica_database,
                    "SELECT 1 FROM concurrency_leases WHERE process_id = $1",
                    lease["process_id"],
                )
            )
        )
    finally:
        doomed.stop()
