"""The worker list of a `lambent serve` with its embedded worker, and its internal routes."""

from __future__ import annotations

from tests.support import Server, Tenant


def test_the_embedded_worker_is_listed(server: Server) -> None:
    with server.admin() as admin:
        response = admin.get("/v1/workers")

    assert response.status_code == 200, response.text
    [worker] = response.json()["workers"]
    assert worker["kind"] == "embedded"
    assert worker["address"] is None
    assert worker["sandbox"] == "process"
    assert worker["capacity_mb"] > 0
    assert worker["used_mb"] + worker["free_mb"] == worker["capacity_mb"]
    assert set(worker["instances"]) == {"initializing", "idle", "busy"}
    assert worker["status"] == "healthy"
    assert worker["last_heartbeat_at"] is None


def test_the_embedded_worker_counts_a_warm_instance(server: Server, tenant: Tenant) -> None:
    tenant.deploy("counted", "def handler(event, context):\n    return 1\n", memory_mb=256)
    with server.admin() as admin:
        before = admin.get("/v1/workers").json()["workers"][0]

        assert tenant.invoke("counted").status_code == 200
        after = admin.get("/v1/workers").json()["workers"][0]

    assert after["instances"]["idle"] == before["instances"]["idle"] + 1
    assert after["used_mb"] == before["used_mb"] + 256


def test_a_server_without_a_worker_token_takes_no_workers(server: Server) -> None:
    registration = {
        "id": "w1",
        "address": "127.0.0.1:1",
        "boot_id": "b",
        "capacity_mb": 1024,
        "cpus": 1,
        "sandbox": "process",
    }
    with server.client("anything") as client:
        response = client.post("/v1/internal/workers", json=registration)

    assert response.status_code == 401
    assert "LAMBENT_WORKER_TOKEN" in response.json()["message"]


def test_internal_routes_are_not_in_the_api_document(server: Server) -> None:
    with server.client() as client:
        paths = client.get("/openapi.json").json()["paths"]

    assert "/v1/workers" in paths
    assert not [p for p in paths if p.startswith("/v1/internal")]
