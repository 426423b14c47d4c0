"""Scheduling through the HTTP API: scale-out, concurrency limits, provisioned concurrency,
keep-alive, eviction and capacity waits.

The scheduler is the same whatever the sandbox; the tests of what the sandbox does for it
(starting instances side by side, reusing them, replacing a dead one) also run with Docker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Server, Tenant, create_tenant, start_server

SLEEPER = """
import os, time, uuid
INSTANCE = uuid.uuid4().hex

def handler(event, context):
    time.sleep(event.get("sleep", 0))
    if event.get("crash"):
        os._exit(3)
    return {"instance": INSTANCE, "init": os.environ["AWS_LAMBDA_INITIALIZATION_TYPE"]}
"""


def invoke_concurrently(tenant: Tenant, name: str, events: list[dict]) -> list:
    with ThreadPoolExecutor(len(events)) as pool:
        return list(pool.map(lambda e: tenant.invoke(name, e), events))


def wait_for(predicate, timeout_s: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def instances(tenant: Tenant, name: str) -> list[dict]:
    response = tenant.http.get(f"/v1/functions/{name}/instances")
    assert response.status_code == 200, response.text
    return response.json()["instances"]


@pytest.mark.both_sandboxes
def test_concurrent_invocations_each_get_their_own_instance(tenant: Tenant) -> None:
    tenant.deploy("burst", SLEEPER, timeout_s=10)

    responses = invoke_concurrently(tenant, "burst", [{"sleep": 0.5}] * 5)

    assert all(r.status_code == 200 for r in responses)
    assert len({r.json()["instance"] for r in responses}) == 5
    listed = instances(tenant, "burst")
    assert len(listed) == 5
    assert {i["state"] for i in listed} == {"idle"}
    assert sum(i["invocations"] for i in listed) == 5


@pytest.mark.both_sandboxes
def test_sequential_invocations_reuse_one_instance(tenant: Tenant) -> None:
    tenant.deploy("steady", SLEEPER)

    seen = {tenant.invoke("steady").json()["instance"] for _ in range(5)}

    assert len(seen) == 1
    [instance] = instances(tenant, "steady")
    assert instance["invocations"] == 5
    assert instance["worker"]


@pytest.mark.both_sandboxes
def test_instance_listing_shows_a_busy_instance(tenant: Tenant) -> None:
    tenant.deploy("busy", SLEEPER, timeout_s=10)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(tenant.invoke, "busy", {"sleep": 2})
        listed = wait_for(
            lambda: [i for i in instances(tenant, "busy") if i["state"] == "busy"], 10
        )
        assert len(listed) == 1
        assert future.result().status_code == 200


def test_reserved_concurrency_of_zero_throttles(tenant: Tenant) -> None:
    tenant.deploy("off", SLEEPER)
    response = tenant.http.put("/v1/functions/off/concurrency", json={"reserved_concurrency": 0})
    assert response.status_code == 200, response.text

    throttled = tenant.invoke("off")

    assert throttled.status_code == 429
    assert throttled.json()["type"] == "TooManyRequestsException"
    assert int(throttled.headers["retry-after"]) >= 1
    assert tenant.http.get("/v1/functions/off").json()["reserved_concurrency"] == 0

    assert tenant.http.delete("/v1/functions/off/concurrency").status_code == 204
    assert tenant.invoke("off").status_code == 200
    assert tenant.http.get("/v1/functions/off").json()["reserved_concurrency"] is None


def test_reserved_concurrency_caps_simultaneous_invocations(tenant: Tenant) -> None:
    tenant.deploy("capped", SLEEPER, timeout_s=10)
    tenant.http.put("/v1/functions/capped/concurrency", json={"reserved_concurrency": 2})

    responses = invoke_concurrently(tenant, "capped", [{"sleep": 1.5}] * 4)

    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 429, 429]
    assert tenant.http.get("/v1/functions/capped/concurrency").json() == {"reserved_concurrency": 2}


def test_tenant_limit_throttles_unreserved_functions(server: Server, tenant: Tenant) -> None:
    with server.admin() as admin:
        response = admin.patch(f"/v1/tenants/{tenant.id}", json={"concurrency_limit": 3})
        assert response.status_code == 200, response.text
        assert response.json()["concurrency_limit"] == 3
    tenant.deploy("shared", SLEEPER, timeout_s=10)
    tenant.deploy("reserved", SLEEPER, timeout_s=10)
    tenant.http.put("/v1/functions/reserved/concurrency", json={"reserved_concurrency": 1})

    # Three of the limit, one reserved: two left for the unreserved function.
    responses = invoke_concurrently(tenant, "shared", [{"sleep": 1.5}] * 3)

    assert sorted(r.status_code for r in responses) == [200, 200, 429]


def test_reservation_beyond_the_tenant_limit_is_refused(server: Server, tenant: Tenant) -> None:
    with server.admin() as admin:
        admin.patch(f"/v1/tenants/{tenant.id}", json={"concurrency_limit": 5})
    tenant.deploy("greedy", SLEEPER)

    response = tenant.http.put("/v1/functions/greedy/concurrency", json={"reserved_concurrency": 6})

    assert response.status_code == 400
    assert response.json()["type"] == "InvalidParameterValueException"


def test_another_tenants_throttle_does_not_touch_this_tenant(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    tenant.deploy("same", SLEEPER)
    other_tenant.deploy("same", SLEEPER)
    tenant.http.put("/v1/functions/same/concurrency", json={"reserved_concurrency": 0})

    assert tenant.invoke("same").status_code == 429
    assert other_tenant.invoke("same").status_code == 200


@pytest.mark.both_sandboxes
def test_provisioned_concurrency_keeps_instances_ready(tenant: Tenant) -> None:
    tenant.deploy("ready", SLEEPER)

    response = tenant.http.put(
        "/v1/functions/ready/provisioned-concurrency", json={"provisioned_concurrency": 2}
    )
    assert response.status_code == 200, response.text
    wait_for(
        lambda: (
            tenant.http.get("/v1/functions/ready/provisioned-concurrency").json()["status"]
            == "READY"
        )
    )
    listed = instances(tenant, "ready")
    assert len(listed) == 2 and all(i["provisioned"] for i in listed)

    first = tenant.invoke("ready")
    record = tenant.invocation(first.headers["x-request-id"])
    assert record["cold_start"] is False
    assert first.json()["init"] == "provisioned-concurrency"

    assert tenant.http.delete("/v1/functions/ready/provisioned-concurrency").status_code == 204
    assert tenant.http.get("/v1/functions/ready").json()["provisioned_concurrency"] == 0


def test_provisioned_concurrency_follows_a_code_change(tenant: Tenant) -> None:
    tenant.deploy("moving", SLEEPER)
    tenant.http.put(
        "/v1/functions/moving/provisioned-concurrency", json={"provisioned_concurrency": 1}
    )
    wait_for(lambda: len(instances(tenant, "moving")) == 1)
    old = instances(tenant, "moving")[0]["id"]

    tenant.http.patch("/v1/functions/moving", json={"description": "new revision"})

    fresh = wait_for(
        lambda: [i for i in instances(tenant, "moving") if i["id"] != old and i["provisioned"]]
    )
    assert len(fresh) == 1
    assert tenant.invocation(tenant.invoke("moving").headers["x-request-id"])["cold_start"] is False


@pytest.mark.both_sandboxes
def test_crashed_instance_is_replaced_on_the_next_invocation(tenant: Tenant) -> None:
    tenant.deploy("crashy", SLEEPER)
    before = tenant.invoke("crashy").json()["instance"]

    crashed = tenant.invoke("crashy", {"crash": True})
    after = tenant.invoke("crashy")

    assert crashed.json()["errorType"] == "Runtime.ExitError"
    assert after.status_code == 200
    assert after.json()["instance"] != before


def test_metrics_need_the_operator_key_and_count_invocations(
    server: Server, tenant: Tenant
) -> None:
    tenant.deploy("counted", SLEEPER)
    tenant.invoke("counted")
    tenant.invoke("counted")
    tenant.http.put("/v1/functions/counted/concurrency", json={"reserved_concurrency": 0})
    tenant.invoke("counted")

    assert tenant.http.get("/metrics").status_code == 403
    with server.admin() as admin:
        response = admin.get("/metrics")
    assert response.status_code == 200
    text = response.text
    mine = {"tenant": tenant.id, "function": "counted"}

    assert sample(text, "lambent_invocations_total", {**mine, "status": "success"}) == 2
    assert sample(text, "lambent_cold_starts_total", mine) == 1
    assert sample(text, "lambent_throttles_total", {**mine, "reason": "reserved"}) == 1
    assert sample(text, "lambent_invocation_duration_seconds_count", mine) == 2
    assert sample(text, "lambent_queue_wait_seconds_count", mine) == 1
    assert sample(text, "lambent_instances", {**mine, "state": "idle"}) == 1


def sample(text: str, name: str, labels: dict[str, str]) -> float:
    for family in text_string_to_metric_families(text):
        for metric in family.samples:
            if metric.name == name and labels.items() <= metric.labels.items():
                return metric.value
    raise AssertionError(f"no sample {name} with {labels}")


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[Server]:
    """A server whose worker holds 256 MB of instances and keeps them idle for 2 s."""
    server = start_server(
        tmp_path / "data",
        admin_key="small-server-operator-key",
        env={
            "LAMBENT_WORKER_MEMORY_MB": "256",
            "LAMBENT_KEEPALIVE_S": "2",
            "LAMBENT_CAPACITY_WAIT_S": "3",
        },
    )
    yield server
    server.stop()


def test_idle_instances_stop_after_the_keepalive(small_server: Server) -> None:
    tenant = create_tenant(small_server)
    tenant.deploy("napper", SLEEPER)
    tenant.invoke("napper")
    assert len(instances(tenant, "napper")) == 1

    wait_for(lambda: instances(tenant, "napper") == [], timeout_s=15)

    again = tenant.invoke("napper")
    assert tenant.invocation(again.headers["x-request-id"])["cold_start"] is True


def test_least_recently_used_idle_instance_makes_room(small_server: Server) -> None:
    tenant = create_tenant(small_server)
    tenant.deploy("old", SLEEPER)
    tenant.deploy("newer", SLEEPER)
    tenant.deploy("big", SLEEPER, memory_mb=256)
    tenant.invoke("old")
    tenant.invoke("newer")

    response = tenant.invoke("big")

    assert response.status_code == 200
    assert instances(tenant, "old") == [] and instances(tenant, "newer") == []
    assert len(instances(tenant, "big")) == 1


def test_an_invocation_waits_for_memory_instead_of_failing(small_server: Server) -> None:
    tenant = create_tenant(small_server)
    tenant.deploy("wide", SLEEPER, memory_mb=256, timeout_s=10)

    responses = invoke_concurrently(tenant, "wide", [{"sleep": 1}] * 2)

    assert [r.status_code for r in responses] == [200, 200]
    records = [tenant.invocation(r.headers["x-request-id"]) for r in responses]
    assert sorted(r["cold_start"] for r in records) == [False, True]


def test_an_invocation_that_cannot_get_memory_in_time_is_503(small_server: Server) -> None:
    tenant = create_tenant(small_server)
    tenant.deploy("hog", SLEEPER, memory_mb=256, timeout_s=20)

    responses = invoke_concurrently(tenant, "hog", [{"sleep": 6}] * 2)

    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 503]
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.json()["type"] == "ServiceUnavailableException"
    assert refused.headers["retry-after"] == "1"
