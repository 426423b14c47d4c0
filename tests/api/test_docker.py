"""What the Docker sandbox promises, checked on the engine's own record of each container."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    Server,
    Tenant,
    container_of,
    create_tenant,
    docker_client,
    require_docker,
    start_server,
    wait_for_prestarted,
)
from workers.sandbox.docker import CPU_PERIOD_US, cpu_quota_us

pytestmark = pytest.mark.docker_only

SANDBOX_UID = 61000
MB = 1024 * 1024

INSTANCE = """
import os


def handler(event, context):
    return os.environ["AWS_LAMBDA_LOG_STREAM_NAME"].rpartition("/")[2]
"""


def test_container_is_locked_down_as_the_sandbox_promises(server: Server, tenant: Tenant) -> None:
    # A fresh container: PYTHON* variables keep a function from the pre-started pool.
    fresh = {"PYTHONDONTWRITEBYTECODE": "1"}
    tenant.deploy("locked", INSTANCE, memory_mb=256, environment=fresh)
    response = tenant.invoke("locked")
    instance = response.json()
    assert tenant.invocation(response.headers["x-request-id"])["start_kind"] == "fresh"

    container = container_of(instance)

    config, host = container["Config"], container["HostConfig"]
    assert config["User"] == f"{SANDBOX_UID}:{SANDBOX_UID}"
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Privileged"] is False
    assert host["Memory"] == host["MemorySwap"] == 256 * MB
    assert host["CpuPeriod"] == CPU_PERIOD_US
    assert host["CpuQuota"] == cpu_quota_us(256, os.cpu_count() or 1)
    assert host["PidsLimit"] == 1024
    assert host["Tmpfs"] == {"/tmp": "size=512m,mode=1777,exec"}
    assert host["Init"] is True
    binds = {bind.split(":")[1]: bind for bind in host["Binds"]}
    assert sorted(binds) == ["/var/lambent/init", "/var/runtime", "/var/runtime/api", "/var/task"]
    assert all(bind.endswith(":ro") for bind in binds.values())
    labels = config["Labels"]
    assert labels["lambent.tenant"] == tenant.id
    assert labels["lambent.instance"] == instance
    assert labels["lambent.worker"] == server.worker_id
    assert labels["lambent.function"]


def test_cpu_quota_grows_with_memory_above_a_floor() -> None:
    assert cpu_quota_us(128, 8) == cpu_quota_us(512, 8) == CPU_PERIOD_US // 2
    assert cpu_quota_us(1769, 8) == CPU_PERIOD_US
    assert cpu_quota_us(3538, 8) == 2 * CPU_PERIOD_US
    # Never more than the host has.
    assert cpu_quota_us(10240, 2) == 2 * CPU_PERIOD_US


def test_a_prestarted_container_takes_its_functions_memory_and_cpu(tenant: Tenant) -> None:
    wait_for_prestarted(tenant.server)
    tenant.deploy("roomy", INSTANCE, memory_mb=2048)

    response = tenant.invoke("roomy")

    assert tenant.invocation(response.headers["x-request-id"])["start_kind"] == "prestarted"
    container = container_of(response.json())
    host = container["HostConfig"]
    assert host["Memory"] == host["MemorySwap"] == 2048 * MB
    assert host["CpuQuota"] == cpu_quota_us(2048, os.cpu_count() or 1)
    # Labels are fixed when a container is made, before its function was known.
    labels = container["Config"]["Labels"]
    assert labels["lambent.prestarted"] == "python3.11"
    assert labels["lambent.instance"] == response.json()
    assert "lambent.tenant" not in labels


def test_a_stopped_instance_leaves_no_container(tenant: Tenant) -> None:
    tenant.deploy("brief", INSTANCE)
    instance = tenant.invoke("brief").json()
    assert container_of(instance)["State"]["Running"] is True

    assert tenant.http.delete("/v1/functions/brief").status_code == 204

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and docker_client().api.containers(
        all=True, filters={"label": f"lambent.instance={instance}"}
    ):
        time.sleep(0.1)
    assert not docker_client().api.containers(
        all=True, filters={"label": f"lambent.instance={instance}"}
    )


@pytest.fixture
def crashing_server(tmp_path: Path) -> Iterator[Path]:
    """A data dir for a Docker server that the test kills and starts again."""
    require_docker()
    yield tmp_path / "data"


def test_containers_of_a_crashed_worker_are_removed_when_it_starts_again(
    crashing_server: Path,
) -> None:
    env = {"LAMBENT_PRESTART_POOL_SIZE": "1"}
    first = start_server(crashing_server, admin_key="crash-test-key", env=env, sandbox="docker")
    try:
        tenant = create_tenant(first)
        tenant.deploy("survivor", INSTANCE)
        instance = tenant.invoke("survivor").json()
        worker_id = first.worker_id
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
    label = {"label": f"lambent.worker={worker_id}"}
    left = {c["Id"] for c in docker_client().api.containers(all=True, filters=label)}
    assert container_of(instance)["Id"] in left

    second = start_server(crashing_server, admin_key="crash-test-key", env=env, sandbox="docker")
    try:
        assert second.worker_id == worker_id
        now = {c["Id"] for c in docker_client().api.containers(all=True, filters=label)}
        assert left.isdisjoint(now)
    finally:
        second.stop()
