"""Remote workers: `lambent worker` processes serving a `lambent serve` with no embedded worker.

Each worker listens on its own loopback address (127.0.0.2, .3, ...), standing in for a host of
its own. Workers that a test kills are "victims" started for that test, with more memory than
the others so that the first new instance lands on them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import (
    LAMBENT,
    Server,
    Tenant,
    WorkerAgent,
    create_tenant,
    free_port,
    spawn_worker,
    start_server,
    start_worker,
    wait_registered,
)
from workers import cgroups

ADMIN_KEY = f"lmbop_test_{uuid.uuid4().hex}"
TOKEN = f"wt_{uuid.uuid4().hex}"
VICTIM_MB = 4096
DEAD_AFTER_S = 5  # LAMBENT_WORKER_DEAD_AFTER_S's default

SLEEPER = """
import os, time, uuid
INSTANCE = uuid.uuid4().hex

def handler(event, context):
    time.sleep(event.get("sleep", 0))
    return {"instance": INSTANCE, "pid": os.getpid()}
"""


@dataclass
class Cluster:
    server: Server
    workers: list[WorkerAgent]
    root: Path
    victims: list[WorkerAgent] = field(default_factory=list)

    @property
    def ids(self) -> set[str]:
        return {w.id for w in self.workers}

    def listed(self) -> dict[str, dict[str, Any]]:
        with self.server.admin() as admin:
            response = admin.get("/v1/workers")
        assert response.status_code == 200, response.text
        return {w["id"]: w for w in response.json()["workers"]}

    def victim(self, **kwargs: Any) -> WorkerAgent:
        worker_id = f"victim-{uuid.uuid4().hex[:6]}"
        victim = start_worker(
            self.server,
            self.root / worker_id,
            TOKEN,
            worker_id=worker_id,
            host="127.0.0.9",
            memory_mb=VICTIM_MB,
            **kwargs,
        )
        self.victims.append(victim)
        return victim


def server_env() -> dict[str, str]:
    return {"LAMBENT_WORKER_TOKEN": TOKEN, "LAMBENT_EMBEDDED_WORKER": "false"}


def start_cluster(
    root: Path,
    count: int,
    *,
    database_url: str | None = None,
    database: str = "sqlite",
    worker_env: dict[str, str] | None = None,
) -> Cluster:
    server = start_server(
        root / "control-plane",
        admin_key=ADMIN_KEY,
        env=server_env(),
        database_url=database_url,
        database=database,
        port=free_port(),
    )
    workers = [
        spawn_worker(
            server,
            root / f"w{n}",
            TOKEN,
            worker_id=f"w{n}",
            host=f"127.0.0.{n + 1}",
            env=worker_env,
        )
        for n in range(1, count + 1)
    ]
    try:
        wait_registered(server, *workers)
    except BaseException:
        stop_cluster(Cluster(server, workers, root))
        raise
    return Cluster(server, workers, root)


def stop_cluster(cluster: Cluster) -> None:
    for worker in [*cluster.workers, *cluster.victims]:
        worker.stop()
    cluster.server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A control plane on SQLite with three remote workers of 1,024 MB each."""
    running = start_cluster(tmp_path_factory.mktemp("cluster"), 3)
    yield running
    stop_cluster(running)


@pytest.fixture
def tenant(cluster: Cluster) -> Iterator[Tenant]:
    created = create_tenant(cluster.server)
    yield created
    created.http.close()


def instances(tenant: Tenant, name: str) -> list[dict[str, Any]]:
    response = tenant.http.get(f"/v1/functions/{name}/instances")
    assert response.status_code == 200, response.text
    return response.json()["instances"]


def wait_for(predicate: Callable[[], Any], timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def invoke_in_background(tenant: Tenant, name: str, event: dict) -> Future[httpx.Response]:
    pool = ThreadPoolExecutor(1)
    future = pool.submit(tenant.invoke, name, event)
    pool.shutdown(wait=False)
    return future


def busy_on(tenant: Tenant, name: str, worker: WorkerAgent) -> dict[str, Any]:
    """Wait until the function has a busy instance on ``worker``."""
    return wait_for(
        lambda: next(
            (
                i
                for i in instances(tenant, name)
                if i["state"] == "busy" and i["worker"] == worker.id
            ),
            None,
        )
    )


def usage_requests(tenant: Tenant, name: str) -> int:
    response = tenant.http.get("/v1/usage")
    assert response.status_code == 200, response.text
    return sum(f["requests"] for f in response.json()["functions"] if f["function"] == name)


# Registration and listing.


def test_workers_register_and_are_listed_with_capacity_and_heartbeats(cluster: Cluster) -> None:
    listed = cluster.listed()

    assert cluster.ids <= set(listed)
    for worker in cluster.workers:
        entry = listed[worker.id]
        assert entry["address"] == worker.address
        assert entry["kind"] == "remote"
        assert entry["sandbox"] == "process"
        assert entry["capacity_mb"] == 1024
        assert entry["cpus"] >= 1
        assert entry["used_mb"] + entry["free_mb"] == 1024
        assert set(entry["instances"]) == {"initializing", "idle", "busy"}
        assert entry["status"] == "healthy"
        assert entry["last_heartbeat_at"] is not None
    assert not [w for w in listed.values() if w["kind"] == "embedded"]


def test_heartbeats_keep_arriving(cluster: Cluster) -> None:
    worker = cluster.workers[0]
    first = cluster.listed()[worker.id]["last_heartbeat_at"]

    later = wait_for(
        lambda: (beat := cluster.listed()[worker.id]["last_heartbeat_at"]) != first and beat,
        timeout_s=5,
    )

    assert later > first


def test_the_worker_list_needs_the_operator_key(cluster: Cluster, tenant: Tenant) -> None:
    assert tenant.http.get("/v1/workers").status_code == 403
    with cluster.server.client() as anonymous:
        assert anonymous.get("/v1/workers").status_code == 401


# Serving invocations.


def test_remote_workers_serve_invocations_and_reuse_one_warm_instance(
    cluster: Cluster, tenant: Tenant
) -> None:
    tenant.deploy("warm", SLEEPER)

    responses = [tenant.invoke("warm") for _ in range(5)]

    assert [r.status_code for r in responses] == [200] * 5
    assert len({r.json()["instance"] for r in responses}) == 1
    [instance] = instances(tenant, "warm")
    assert instance["worker"] in cluster.ids
    assert instance["invocations"] == 5
    # The counts are as of the worker's last heartbeat.
    wait_for(lambda: cluster.listed()[instance["worker"]]["instances"]["idle"] >= 1, timeout_s=5)
    assert cluster.listed()[instance["worker"]]["used_mb"] >= 128


def test_a_burst_goes_to_the_workers_with_the_most_free_memory(
    cluster: Cluster, tenant: Tenant
) -> None:
    # 512 MB each: a worker that took one has less free than one that took none, so most-free
    # placement spreads the burst; first-fit would put two on one worker.
    tenant.deploy("burst", SLEEPER, memory_mb=512)
    free = [w["free_mb"] for i, w in cluster.listed().items() if i in cluster.ids]
    assert max(free) - min(free) < 512, free

    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda _: tenant.invoke("burst", {"sleep": 1.5}), range(3)))

    assert [r.status_code for r in responses] == [200] * 3
    placed = [i["worker"] for i in instances(tenant, "burst")]
    assert sorted(placed) == sorted(cluster.ids)


def test_a_package_reaches_a_worker_through_the_control_plane(
    cluster: Cluster, tenant: Tenant
) -> None:
    blob = os.urandom(300_000)
    fn = tenant.deploy("packaged", files={"app.py": SLEEPER, "data/blob.bin": blob})

    response = tenant.invoke("packaged")

    assert response.status_code == 200, response.text
    [instance] = instances(tenant, "packaged")
    worker = next(w for w in cluster.workers if w.id == instance["worker"])
    cached = worker.sandbox_dir / "code" / fn["code_sha256"] / "data" / "blob.bin"
    assert cached.read_bytes() == blob


# Tokens.


def test_the_control_plane_refuses_a_wrong_worker_token(cluster: Cluster) -> None:
    registration = {
        "id": "intruder",
        "address": "127.0.0.1:1",
        "boot_id": "x",
        "capacity_mb": 1024,
        "cpus": 1,
        "sandbox": "process",
    }
    with cluster.server.client("not-the-token") as wrong:
        assert wrong.post("/v1/internal/workers", json=registration).status_code == 401
        beat = {"boot_id": "x", "reserved_mb": 0, "seq": 0}
        assert wrong.post("/v1/internal/workers/w1/heartbeat", json=beat).status_code == 401
        assert wrong.get(f"/v1/internal/packages/{'0' * 64}").status_code == 401
    with cluster.server.admin() as operator:
        assert operator.post("/v1/internal/workers", json=registration).status_code == 401
    assert "intruder" not in cluster.listed()


def test_a_worker_with_a_wrong_token_exits_unregistered(cluster: Cluster) -> None:
    data_dir = cluster.root / "wrong-token"
    worker = spawn_worker(cluster.server, data_dir, "not-the-token", worker_id="wrong-token")
    try:
        status = worker.process.wait(timeout=30)
    finally:
        worker.stop()

    assert status == 1
    assert "refused" in worker.log()
    assert "wrong-token" not in cluster.listed()


def test_a_worker_refuses_a_wrong_token(cluster: Cluster) -> None:
    worker = cluster.workers[0]

    wrong = httpx.get(f"{worker.base_url}/v1/health", headers={"Authorization": "Bearer nope"})
    missing = httpx.post(f"{worker.base_url}/v1/instances", json={})
    right = httpx.get(f"{worker.base_url}/v1/health", headers={"Authorization": f"Bearer {TOKEN}"})

    assert wrong.status_code == 401
    assert missing.status_code == 401
    assert right.status_code == 200
    assert right.json()["worker_id"] == worker.id


# Workers that die.


def test_a_worker_killed_mid_invocation_answers_502_at_once_and_bills_once(
    cluster: Cluster, tenant: Tenant
) -> None:
    tenant.deploy("doomed", SLEEPER, timeout_s=60)
    victim = cluster.victim()
    pending = invoke_in_background(tenant, "doomed", {"sleep": 30})
    busy_on(tenant, "doomed", victim)

    victim.kill()
    killed_at = time.monotonic()
    response = pending.result(timeout=30)
    answered_s = time.monotonic() - killed_at

    assert response.status_code == 502
    assert response.json()["type"] == "WorkerLostException"
    assert answered_s < 15
    request_id = response.headers["x-request-id"]
    record = tenant.invocation(request_id)
    assert record["status"] == "error"
    assert record["error_type"] == "Lambent.WorkerLost"
    assert record["billed_duration_ms"] == 0
    listed = tenant.http.get("/v1/functions/doomed/invocations").json()["invocations"]
    assert [i["request_id"] for i in listed] == [request_id]
    assert usage_requests(tenant, "doomed") == 1

    retry = tenant.invoke("doomed")

    assert retry.status_code == 200, retry.text
    [instance] = instances(tenant, "doomed")
    assert instance["worker"] in cluster.ids
    assert usage_requests(tenant, "doomed") == 2


def test_a_worker_that_stops_answering_is_declared_dead_and_its_calls_fail_fast(
    cluster: Cluster, tenant: Tenant
) -> None:
    # SIGSTOP keeps the connections open, as a host that vanished from the network does: only
    # the missing heartbeats tell.
    tenant.deploy("frozen", SLEEPER, timeout_s=120)
    # A keep-alive of 1 s makes the victim stop instances idle for 2 s itself.
    victim = cluster.victim(env={"LAMBENT_KEEPALIVE_S": "1"})
    # Long enough to outlast the declaration of death (and the test's wait for the 502).
    pending = invoke_in_background(tenant, "frozen", {"sleep": 14})
    running = busy_on(tenant, "frozen", victim)

    victim.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    response = pending.result(timeout=30)
    answered_s = time.monotonic() - stopped_at

    assert response.status_code == 502
    assert response.json()["type"] == "WorkerLostException"
    assert DEAD_AFTER_S - 1 < answered_s < 15
    listed = cluster.listed()[victim.id]
    assert listed["status"] == "dead"
    assert listed["free_mb"] == 0
    assert instances(tenant, "frozen") == []

    # Back again, it registers anew. The instance that was running belongs to no control plane
    # now, and none stops it (it could be another API process's): it finishes, and the worker
    # stops it once it has been idle past its keep-alive and margin.
    victim.signal(signal.SIGCONT)
    wait_for(lambda: cluster.listed()[victim.id]["status"] == "healthy")
    assert [i["id"] for i in instances(tenant, "frozen")] == [running["id"]]
    wait_for(lambda: cluster.listed()[victim.id]["used_mb"] == 0)
    idle = {"initializing": 0, "idle": 0, "busy": 0}
    wait_for(lambda: cluster.listed()[victim.id]["instances"] == idle, timeout_s=5)
    assert instances(tenant, "frozen") == []
    victim.stop()


def test_an_idle_worker_killed_is_declared_dead_and_traffic_moves_on(
    cluster: Cluster, tenant: Tenant
) -> None:
    tenant.deploy("orphaned", SLEEPER)
    victim = cluster.victim()
    assert tenant.invoke("orphaned").status_code == 200
    [before] = instances(tenant, "orphaned")
    assert before["worker"] == victim.id

    victim.kill()
    # Before the heartbeats tell, the warm instance's worker refuses connections: nothing ran,
    # so the invocation starts an instance elsewhere.
    response = tenant.invoke("orphaned")

    assert response.status_code == 200, response.text
    [after] = instances(tenant, "orphaned")
    assert after["worker"] in cluster.ids
    killed = wait_for(
        lambda: (w := cluster.listed()[victim.id])["status"] == "dead" and w,
        timeout_s=DEAD_AFTER_S + 5,
    )
    assert killed["last_heartbeat_at"] is not None
    assert killed["instances"] == {"initializing": 0, "idle": 0, "busy": 0}


def test_an_operator_forgets_a_dead_worker_but_not_a_live_one(cluster: Cluster) -> None:
    victim = cluster.victim()
    with cluster.server.admin() as operator:
        alive = operator.delete(f"/v1/workers/{victim.id}")
        victim.kill()
        wait_for(
            lambda: cluster.listed()[victim.id]["status"] == "dead", timeout_s=DEAD_AFTER_S + 5
        )
        dead = operator.delete(f"/v1/workers/{victim.id}")
        unknown = operator.delete("/v1/workers/no-such-worker")

    assert alive.status_code == 409
    assert dead.status_code == 204
    assert unknown.status_code == 404
    assert victim.id not in cluster.listed()


def test_a_restarted_worker_removes_the_sandboxes_a_kill_left(
    cluster: Cluster, tenant: Tenant
) -> None:
    tenant.deploy("leaky", SLEEPER)
    victim = cluster.victim()
    assert tenant.invoke("leaky").status_code == 200
    [instance] = instances(tenant, "leaky")
    assert instance["worker"] == victim.id
    instance_dir = victim.sandbox_dir / "instances" / instance["id"]
    groups = cgroups.InstanceCgroup(instance["id"]).paths.values()
    assert instance_dir.is_dir()

    victim.kill()

    assert instance_dir.is_dir()  # what the killed worker left behind
    restarted = start_worker(
        cluster.server,
        victim.data_dir,
        TOKEN,
        worker_id=victim.id,
        host=victim.host,
        port=victim.port,
        memory_mb=VICTIM_MB,
    )
    cluster.victims.append(restarted)

    assert not instance_dir.exists()
    assert not [group for group in groups if group.exists()]
    wait_for(lambda: cluster.listed()[victim.id]["used_mb"] == 0, timeout_s=5)
    restarted.stop()


def test_a_stopped_worker_finishes_its_invocation_and_deregisters(
    cluster: Cluster, tenant: Tenant
) -> None:
    tenant.deploy("drained", SLEEPER, timeout_s=30)
    victim = cluster.victim()
    pending = invoke_in_background(tenant, "drained", {"sleep": 3})
    busy_on(tenant, "drained", victim)

    victim.signal(signal.SIGTERM)
    wait_for(lambda: victim.id not in cluster.listed(), timeout_s=5)
    response = pending.result(timeout=30)

    assert response.status_code == 200, response.text
    assert victim.process.wait(timeout=30) == 0
    assert tenant.invoke("drained").status_code == 200
    [instance] = instances(tenant, "drained")
    assert instance["worker"] in cluster.ids


# Control plane restarts.


def restart(server: Server, **kwargs: Any) -> Server:
    port = int(server.base_url.rsplit(":", 1)[1])
    return start_server(server.data_dir, admin_key=ADMIN_KEY, env=server_env(), port=port, **kwargs)


def test_a_restarted_control_plane_finds_its_workers(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path, 2)
    try:
        tenant = create_tenant(cluster.server)
        tenant.deploy("survivor", SLEEPER)
        assert tenant.invoke("survivor").status_code == 200

        cluster.server.stop()
        cluster.server = restart(cluster.server)

        listed = cluster.listed()
        assert {listed[i]["status"] for i in cluster.ids} == {"healthy"}
        response = tenant.invoke("survivor")
        assert response.status_code == 200, response.text
        [instance] = instances(tenant, "survivor")
        assert instance["worker"] in cluster.ids
    finally:
        stop_cluster(cluster)


def test_a_crashed_control_plane_on_postgresql_finds_its_workers_and_their_orphans_age_out(
    tmp_path: Path, postgres_database: str
) -> None:
    # The workers stop instances idle for 6 s + 3 s themselves: long enough to see the orphan
    # survive the restart, short enough to see it go.
    cluster = start_cluster(
        tmp_path,
        2,
        database_url=postgres_database,
        database="postgresql",
        worker_env={"LAMBENT_KEEPALIVE_S": "6"},
    )
    try:
        tenant = create_tenant(cluster.server)
        tenant.deploy("phoenix", SLEEPER)
        before = tenant.invoke("phoenix")
        assert before.status_code == 200, before.text
        [orphan] = instances(tenant, "phoenix")

        cluster.server.process.kill()
        cluster.server.process.wait()
        cluster.server = restart(
            cluster.server, database_url=postgres_database, database="postgresql"
        )

        listed = cluster.listed()
        assert {listed[i]["status"] for i in cluster.ids} == {"healthy"}
        # Nobody knows the orphan any more, and nobody stops it at once: it might as well be
        # another API process's warm instance.
        assert [i["id"] for i in instances(tenant, "phoenix")] == [orphan["id"]]
        after = tenant.invoke("phoenix")
        assert after.status_code == 200, after.text
        assert after.json()["instance"] != before.json()["instance"]
        assert tenant.invocation(after.headers["x-request-id"])["cold_start"] is True

        wait_for(
            lambda: orphan["id"] not in {i["id"] for i in instances(tenant, "phoenix")},
            timeout_s=15,
        )
    finally:
        stop_cluster(cluster)


def test_lambent_worker_needs_a_token_and_a_control_plane(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMBENT_")}
    env["LAMBENT_DATA_DIR"] = str(tmp_path)

    no_token = subprocess.run(
        [str(LAMBENT), "worker", "--control-plane", "http://127.0.0.1:1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    no_url = subprocess.run(
        [str(LAMBENT), "worker"],
        env={**env, "LAMBENT_WORKER_TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert no_token.returncode == 2
    assert "LAMBENT_WORKER_TOKEN" in no_token.stderr
    assert no_url.returncode == 2
    assert "--control-plane" in no_url.stderr
