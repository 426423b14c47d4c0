"""Tenants and API keys through the HTTP API: the operator's routes and who may call what."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable

import httpx
import pytest

from tests.support import Server, Tenant, create_tenant

HANDLER = "def handler(event, context):\n    return 'ok'\n"

# One request per tenant route; the bodies are valid so that only the key decides the answer.
TENANT_ROUTES: list[tuple[str, str, dict[str, object]]] = [
    ("GET", "/v1/functions", {}),
    ("POST", "/v1/functions", {"json": {"name": "f", "runtime": "python3.11", "handler": "a.b"}}),
    ("GET", "/v1/functions/f", {}),
    ("PATCH", "/v1/functions/f", {"json": {"memory_mb": 256}}),
    ("PUT", "/v1/functions/f/code", {"json": {"zip_base64": ""}}),
    ("DELETE", "/v1/functions/f", {}),
    ("POST", "/v1/functions/f/invocations", {"json": {}}),
    ("GET", "/v1/functions/f/invocations", {}),
    ("GET", f"/v1/invocations/{uuid.uuid4()}", {}),
    ("GET", "/v1/usage", {}),
]
OPERATOR_ROUTES: list[tuple[str, str, dict[str, object]]] = [
    ("GET", "/v1/tenants", {}),
    ("POST", "/v1/tenants", {"json": {"name": "never-created"}}),
    ("DELETE", "/v1/tenants/0123456789abcdef0123456789abcdef", {}),
]


def unique_name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def blobs(server: Server) -> set[str]:
    root = server.data_dir / "packages"
    return {p.name for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def test_created_tenant_gets_a_key_that_works_at_once(server: Server) -> None:
    name = unique_name()

    with server.admin() as admin:
        response = admin.post("/v1/tenants", json={"name": name})

    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "name", "api_key", "concurrency_limit", "created_at"}
    assert body["name"] == name
    assert body["api_key"].startswith("lmb_")
    with server.client(body["api_key"]) as client:
        listed = client.get("/v1/functions")
    assert listed.status_code == 200
    assert listed.json()["functions"] == []


def test_tenant_list_never_shows_keys(server: Server, tenant: Tenant) -> None:
    with server.admin() as admin:
        response = admin.get("/v1/tenants")

    assert response.status_code == 200
    listed = {t["id"]: t for t in response.json()["tenants"]}
    assert listed[tenant.id]["name"] == tenant.name
    assert set(listed[tenant.id]) == {"id", "name", "concurrency_limit", "created_at"}
    assert tenant.key not in response.text


def test_duplicate_tenant_name_is_a_conflict(server: Server, tenant: Tenant) -> None:
    with server.admin() as admin:
        response = admin.post("/v1/tenants", json={"name": tenant.name})

    assert response.status_code == 409
    assert response.json()["type"] == "ResourceConflictException"


@pytest.mark.parametrize("name", ["", "has space", "../x", "a/b", "x" * 65, "ünïcode"])
def test_malformed_tenant_name_is_a_validation_error(server: Server, name: str) -> None:
    with server.admin() as admin:
        response = admin.post("/v1/tenants", json={"name": name})

    assert response.status_code == 422
    assert response.json()["type"] == "ValidationError"


def test_deleted_tenants_key_is_refused_at_once(server: Server) -> None:
    doomed = create_tenant(server)
    # A request first, so that the key sits in the server's key cache when it is deleted.
    assert doomed.http.get("/v1/functions").status_code == 200

    with server.admin() as admin:
        deleted = admin.delete(f"/v1/tenants/{doomed.id}")
    response = doomed.http.get("/v1/functions")

    assert deleted.status_code == 204
    assert response.status_code == 401
    assert response.json()["type"] == "Unauthorized"
    doomed.http.close()


def test_deleted_tenant_disappears_from_the_list(server: Server) -> None:
    doomed = create_tenant(server)
    doomed.http.close()

    with server.admin() as admin:
        admin.delete(f"/v1/tenants/{doomed.id}")
        listed = admin.get("/v1/tenants").json()["tenants"]

    assert doomed.id not in {t["id"] for t in listed}


def test_deleted_tenants_name_can_be_taken_again_without_its_functions(server: Server) -> None:
    doomed = create_tenant(server)
    doomed.deploy("kept-name", HANDLER)
    doomed.http.close()

    with server.admin() as admin:
        admin.delete(f"/v1/tenants/{doomed.id}")
    successor = create_tenant(server, doomed.name)

    assert successor.id != doomed.id
    assert successor.http.get("/v1/functions").json()["functions"] == []
    assert successor.http.get("/v1/functions/kept-name").status_code == 404
    successor.http.close()


def test_deleting_a_tenant_removes_packages_no_one_else_uses(server: Server) -> None:
    doomed = create_tenant(server)
    # Unique source, so that no other test's function shares this package.
    source = HANDLER + f"# {uuid.uuid4()}\n"
    sha256 = doomed.deploy("owned", source)["code_sha256"]
    doomed.deploy("owned-too", source)
    doomed.http.close()
    assert sha256 in blobs(server)

    with server.admin() as admin:
        admin.delete(f"/v1/tenants/{doomed.id}")

    assert sha256 not in blobs(server)


def test_deleting_a_tenant_keeps_packages_another_tenant_uses(
    server: Server, other_tenant: Tenant
) -> None:
    doomed = create_tenant(server)
    source = HANDLER + f"# {uuid.uuid4()}\n"
    sha256 = doomed.deploy("shared", source)["code_sha256"]
    other_tenant.deploy("shared", source)
    doomed.http.close()

    with server.admin() as admin:
        admin.delete(f"/v1/tenants/{doomed.id}")

    assert sha256 in blobs(server)
    assert other_tenant.invoke("shared").json() == "ok"


def test_deleting_an_unknown_tenant_is_not_found(server: Server) -> None:
    with server.admin() as admin:
        response = admin.delete(f"/v1/tenants/{uuid.uuid4().hex}")

    assert response.status_code == 404
    assert response.json()["type"] == "ResourceNotFound"


@pytest.mark.parametrize(("method", "path", "kwargs"), OPERATOR_ROUTES)
def test_operator_routes_refuse_a_tenant_key(
    server: Server, tenant: Tenant, method: str, path: str, kwargs: dict[str, object]
) -> None:
    response = tenant.http.request(method, path, **kwargs)  # type: ignore[arg-type]

    assert response.status_code == 403
    assert response.json()["type"] == "AccessDenied"


def test_tenant_key_cannot_create_a_tenant(server: Server, tenant: Tenant) -> None:
    name = unique_name()

    tenant.http.post("/v1/tenants", json={"name": name})

    with server.admin() as admin:
        listed = admin.get("/v1/tenants").json()["tenants"]
    assert name not in {t["name"] for t in listed}


@pytest.mark.parametrize(("method", "path", "kwargs"), TENANT_ROUTES)
def test_tenant_routes_refuse_the_operator_key(
    server: Server, method: str, path: str, kwargs: dict[str, object]
) -> None:
    with server.admin() as admin:
        response = admin.request(method, path, **kwargs)  # type: ignore[arg-type]

    assert response.status_code == 403
    assert response.json()["type"] == "AccessDenied"


BAD_AUTHORIZATION: dict[str, Callable[[str], dict[str, str]]] = {
    "missing": lambda key: {},
    "scheme without a key": lambda key: {"Authorization": "Bearer"},
    "garbage key": lambda key: {"Authorization": "Bearer lmb_not-a-real-key"},
    "key without a scheme": lambda key: {"Authorization": key},
    "basic scheme": lambda key: {
        "Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    },
    "token scheme": lambda key: {"Authorization": f"Token {key}"},
}


@pytest.mark.parametrize("case", sorted(BAD_AUTHORIZATION))
@pytest.mark.parametrize("path", ["/v1/functions", "/v1/tenants"])
def test_request_without_a_valid_bearer_key_is_unauthorized(
    server: Server, tenant: Tenant, case: str, path: str
) -> None:
    # The tenant's real key, sent the wrong way, must be refused like no key at all.
    headers = BAD_AUTHORIZATION[case](tenant.key)

    with httpx.Client(base_url=server.base_url, headers=headers) as client:
        response = client.get(path)

    assert response.status_code == 401
    assert response.json()["type"] == "Unauthorized"


def test_health_check_needs_no_key(server: Server) -> None:
    with server.client() as client:
        response = client.get("/healthz")

    assert response.status_code == 200
