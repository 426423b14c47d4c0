"""Tenant isolation through the HTTP API: another tenant's resources are simply not found."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.support import Tenant, make_zip

OWNER_CODE = "def handler(event, context):\n    return 'owner'\n"
INTRUDER_CODE = "def handler(event, context):\n    return 'intruder'\n"


def intruder_package() -> bytes:
    return make_zip({"app.py": INTRUDER_CODE})


# Every way to reach one function by name; each request would succeed for the owner.
FUNCTION_REQUESTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "get": ("GET", "/v1/functions/private", {}),
    "patch": ("PATCH", "/v1/functions/private", {"json": {"memory_mb": 256}}),
    "put code as json": (
        "PUT",
        "/v1/functions/private/code",
        {"json": {"zip_base64": base64.b64encode(intruder_package()).decode()}},
    ),
    "put code as zip": (
        "PUT",
        "/v1/functions/private/code",
        {"content": intruder_package(), "headers": {"content-type": "application/zip"}},
    ),
    "put code as multipart": (
        "PUT",
        "/v1/functions/private/code",
        {"files": {"code": ("code.zip", intruder_package(), "application/zip")}},
    ),
    "delete": ("DELETE", "/v1/functions/private", {}),
    "invoke": ("POST", "/v1/functions/private/invocations", {"json": {}}),
    "list invocations": ("GET", "/v1/functions/private/invocations", {}),
}


def assert_not_found(response: httpx.Response) -> None:
    assert response.status_code == 404, response.text
    assert response.json()["type"] == "ResourceNotFound"


def usage_now(tenant: Tenant) -> dict[str, Any]:
    now = datetime.now(UTC)
    window = {
        "start": (now - timedelta(hours=1)).isoformat(),
        "end": (now + timedelta(hours=1)).isoformat(),
    }
    response = tenant.http.get("/v1/usage", params=window)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("request_name", list(FUNCTION_REQUESTS))
def test_another_tenants_function_is_not_found_and_left_unchanged(
    tenant: Tenant, other_tenant: Tenant, request_name: str
) -> None:
    created = tenant.deploy("private", OWNER_CODE)
    method, path, kwargs = FUNCTION_REQUESTS[request_name]

    response = other_tenant.http.request(method, path, **kwargs)

    assert_not_found(response)
    assert tenant.http.get("/v1/functions/private").json() == created
    assert tenant.invoke("private").json() == "owner"


def test_owner_sees_no_invocation_made_by_another_tenant(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    tenant.deploy("private", OWNER_CODE)

    other_tenant.invoke("private")

    assert tenant.http.get("/v1/functions/private/invocations").json()["invocations"] == []


def test_another_tenants_invocation_is_not_found_by_request_id(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    tenant.deploy("private", OWNER_CODE)
    request_id = tenant.invoke("private").headers["x-request-id"]

    assert_not_found(other_tenant.http.get(f"/v1/invocations/{request_id}"))
    assert tenant.invocation(request_id)["request_id"] == request_id


def test_function_list_holds_only_the_callers_functions(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    tenant.deploy("alpha", OWNER_CODE)
    tenant.deploy("beta", OWNER_CODE)
    other_tenant.deploy("gamma", INTRUDER_CODE)

    mine = tenant.http.get("/v1/functions").json()["functions"]
    theirs = other_tenant.http.get("/v1/functions").json()["functions"]

    assert [fn["name"] for fn in mine] == ["alpha", "beta"]
    assert [fn["name"] for fn in theirs] == ["gamma"]


def test_pagination_token_does_not_reach_into_another_tenant(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    tenant.deploy("b-owner", OWNER_CODE)
    other_tenant.deploy("a-other", INTRUDER_CODE)

    page = other_tenant.http.get("/v1/functions", params={"next_token": "a"}).json()

    assert [fn["name"] for fn in page["functions"]] == ["a-other"]


def test_usage_holds_only_the_callers_functions(tenant: Tenant, other_tenant: Tenant) -> None:
    tenant.deploy("metered", OWNER_CODE)
    tenant.invoke("metered")
    tenant.invoke("metered")

    theirs = usage_now(other_tenant)
    mine = usage_now(tenant)

    assert theirs["functions"] == []
    assert theirs["total"] == {"requests": 0, "billed_ms": 0, "gb_seconds": 0.0}
    assert [f["function"] for f in mine["functions"]] == ["metered"]
    assert mine["functions"][0]["requests"] == 2


def test_usage_of_same_named_functions_is_counted_per_tenant(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    tenant.deploy("same", OWNER_CODE)
    other_tenant.deploy("same", INTRUDER_CODE)
    for _ in range(3):
        tenant.invoke("same")
    other_tenant.invoke("same")

    assert usage_now(tenant)["total"]["requests"] == 3
    assert usage_now(other_tenant)["total"]["requests"] == 1


def test_same_function_name_in_two_tenants_runs_each_tenants_code(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    mine = tenant.deploy("same", OWNER_CODE, memory_mb=128)
    theirs = other_tenant.deploy("same", INTRUDER_CODE, memory_mb=256)

    assert mine["arn"] != theirs["arn"]
    assert tenant.invoke("same").json() == "owner"
    assert other_tenant.invoke("same").json() == "intruder"
    # Again, now that both are warm and cached.
    assert tenant.invoke("same").json() == "owner"
    assert other_tenant.invoke("same").json() == "intruder"
    assert tenant.http.get("/v1/functions/same").json()["memory_mb"] == 128


def test_deleting_a_same_named_function_leaves_the_other_tenants_alone(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    tenant.deploy("same", OWNER_CODE)
    other_tenant.deploy("same", INTRUDER_CODE)

    assert other_tenant.http.delete("/v1/functions/same").status_code == 204

    assert tenant.invoke("same").json() == "owner"
    assert_not_found(other_tenant.http.get("/v1/functions/same"))
