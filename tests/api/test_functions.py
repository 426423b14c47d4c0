"""Creating, reading, listing, changing and deleting functions through the HTTP API."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

import pytest

from tests.support import Tenant, make_zip

RETURNS_ONE = "def handler(event, context):\n    return 'one'\n"
RETURNS_TWO = "def handler(event, context):\n    return 'two'\n"


def encoded(package: bytes) -> str:
    return base64.b64encode(package).decode()


def create_body(name: str, package: bytes | None = None, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "runtime": "python3.11",
        "handler": "app.handler",
        "code": {"zip_base64": encoded(package or make_zip({"app.py": RETURNS_ONE}))},
    }
    body.update(overrides)
    return body


def assert_validation_error(response: Any) -> None:
    assert response.status_code == 422, response.text
    assert response.json()["type"] == "ValidationError"


# Creating.


def test_json_create_returns_configuration_and_code_identity(tenant: Tenant) -> None:
    package = make_zip({"app.py": RETURNS_ONE})

    response = tenant.http.post(
        "/v1/functions",
        json=create_body(
            "made",
            package,
            memory_mb=256,
            timeout_s=10,
            environment={"STAGE": "test"},
            description="a test function",
        ),
    )

    assert response.status_code == 201, response.text
    fn = response.json()
    assert fn["name"] == "made"
    assert fn["runtime"] == "python3.11"
    assert fn["handler"] == "app.handler"
    assert fn["memory_mb"] == 256
    assert fn["timeout_s"] == 10
    assert fn["environment"] == {"STAGE": "test"}
    assert fn["description"] == "a test function"
    assert fn["code_sha256"] == hashlib.sha256(package).hexdigest()
    assert fn["code_size"] == len(package)
    assert fn["arn"].endswith(f":{tenant.id}:function:made")
    assert isinstance(fn["revision"], int)


def test_create_defaults_to_128_mb_and_3_seconds(tenant: Tenant) -> None:
    fn = tenant.deploy("defaults", RETURNS_ONE)

    assert fn["memory_mb"] == 128
    assert fn["timeout_s"] == 3
    assert fn["environment"] == {}
    assert fn["description"] == ""


def test_multipart_create_takes_fields_and_a_code_file(tenant: Tenant) -> None:
    package = make_zip({"app.py": RETURNS_TWO})

    response = tenant.http.post(
        "/v1/functions",
        data={
            "name": "multi",
            "runtime": "python3.11",
            "handler": "app.handler",
            "memory_mb": "256",
            "timeout_s": "5",
            "environment": json.dumps({"COLOR": "blue"}),
            "description": "from a form",
        },
        files={"code": ("code.zip", package, "application/zip")},
    )

    assert response.status_code == 201, response.text
    fn = response.json()
    assert (fn["memory_mb"], fn["timeout_s"]) == (256, 5)
    assert fn["environment"] == {"COLOR": "blue"}
    assert fn["description"] == "from a form"
    assert fn["code_sha256"] == hashlib.sha256(package).hexdigest()
    assert tenant.invoke("multi").json() == "two"


def test_multipart_create_accepts_a_five_megabyte_package(tenant: Tenant) -> None:
    # Random bytes do not compress: the zip itself is over 5 MB.
    package = make_zip({"app.py": RETURNS_ONE, "data.bin": os.urandom(5 * 1024 * 1024)})

    response = tenant.http.post(
        "/v1/functions",
        data={"name": "five-mb", "runtime": "python3.11", "handler": "app.handler"},
        files={"code": ("code.zip", package, "application/zip")},
    )

    assert response.status_code == 201, response.text
    assert response.json()["code_size"] == len(package) > 5 * 1024 * 1024


def test_multipart_create_rejects_an_unknown_field(tenant: Tenant) -> None:
    response = tenant.http.post(
        "/v1/functions",
        data={"name": "extra", "runtime": "python3.11", "handler": "app.handler", "role": "x"},
        files={"code": ("code.zip", make_zip({"app.py": RETURNS_ONE}), "application/zip")},
    )

    assert_validation_error(response)
    assert tenant.http.get("/v1/functions/extra").status_code == 404


def test_multipart_create_with_too_many_fields_is_invalid_request_content(tenant: Tenant) -> None:
    fields = {"name": "crowded", "runtime": "python3.11", "handler": "app.handler"}
    fields.update({f"field{i}": "x" for i in range(10)})

    response = tenant.http.post(
        "/v1/functions",
        data=fields,
        files={"code": ("code.zip", make_zip({"app.py": RETURNS_ONE}), "application/zip")},
    )

    assert response.status_code == 400
    assert response.json()["type"] == "InvalidRequestContentException"


@pytest.mark.parametrize("memory_mb", [128, 10240])
def test_memory_at_either_limit_is_accepted(tenant: Tenant, memory_mb: int) -> None:
    fn = tenant.deploy("mem", RETURNS_ONE, memory_mb=memory_mb)

    assert fn["memory_mb"] == memory_mb


@pytest.mark.parametrize("memory_mb", [127, 10241])
def test_memory_outside_128_to_10240_mb_is_rejected(tenant: Tenant, memory_mb: int) -> None:
    response = tenant.http.post("/v1/functions", json=create_body("mem", memory_mb=memory_mb))

    assert_validation_error(response)
    assert "memory_mb" in response.json()["message"]


@pytest.mark.parametrize("timeout_s", [1, 900])
def test_timeout_at_either_limit_is_accepted(tenant: Tenant, timeout_s: int) -> None:
    fn = tenant.deploy("time", RETURNS_ONE, timeout_s=timeout_s)

    assert fn["timeout_s"] == timeout_s


@pytest.mark.parametrize("timeout_s", [0, 901])
def test_timeout_outside_1_to_900_seconds_is_rejected(tenant: Tenant, timeout_s: int) -> None:
    response = tenant.http.post("/v1/functions", json=create_body("time", timeout_s=timeout_s))

    assert_validation_error(response)
    assert "timeout_s" in response.json()["message"]


def test_name_of_64_characters_is_accepted(tenant: Tenant) -> None:
    name = "Ab_-9" + "x" * 59

    assert tenant.deploy(name, RETURNS_ONE)["name"] == name


@pytest.mark.parametrize("name", ["x" * 65, "has space", "../x", "", "a/b", "dot.ted"])
def test_malformed_name_is_rejected(tenant: Tenant, name: str) -> None:
    response = tenant.http.post("/v1/functions", json=create_body(name))

    assert_validation_error(response)
    assert tenant.http.get("/v1/functions").json()["functions"] == []


def test_unknown_runtime_is_rejected(tenant: Tenant) -> None:
    response = tenant.http.post("/v1/functions", json=create_body("rt", runtime="python2.7"))

    assert_validation_error(response)
    assert "runtime" in response.json()["message"]


def test_missing_handler_is_rejected(tenant: Tenant) -> None:
    body = create_body("nohandler")
    del body["handler"]

    response = tenant.http.post("/v1/functions", json=body)

    assert_validation_error(response)
    assert "handler" in response.json()["message"]


@pytest.mark.parametrize("key", ["AWS_REGION", "_HANDLER", "LAMBENT_X", "AWS_LAMBDA_RUNTIME_API"])
def test_reserved_environment_variable_is_rejected(tenant: Tenant, key: str) -> None:
    response = tenant.http.post("/v1/functions", json=create_body("env", environment={key: "v"}))

    assert_validation_error(response)
    assert key in response.json()["message"]


@pytest.mark.parametrize("value", [1, True, None, ["a"], {"nested": "x"}])
def test_environment_value_that_is_not_a_string_is_rejected(tenant: Tenant, value: Any) -> None:
    response = tenant.http.post(
        "/v1/functions", json=create_body("env", environment={"SETTING": value})
    )

    assert_validation_error(response)


def test_environment_of_exactly_4_kb_is_accepted(tenant: Tenant) -> None:
    # Names and values count together: 3 + 4093 bytes.
    environment = {"BIG": "x" * 4093}

    assert tenant.deploy("env4k", RETURNS_ONE, environment=environment)["environment"] == (
        environment
    )


def test_environment_over_4_kb_is_rejected(tenant: Tenant) -> None:
    response = tenant.http.post(
        "/v1/functions", json=create_body("env", environment={"BIG": "x" * 4094})
    )

    assert_validation_error(response)
    assert "4096" in response.json()["message"]


@pytest.mark.parametrize("field", ["role", "Memory_mb", "layers"])
def test_unknown_field_is_rejected(tenant: Tenant, field: str) -> None:
    response = tenant.http.post("/v1/functions", json=create_body("extra", **{field: 1}))

    assert_validation_error(response)
    assert field in response.json()["message"]


def test_duplicate_name_is_a_conflict(tenant: Tenant) -> None:
    tenant.deploy("twice", RETURNS_ONE)

    response = tenant.http.post("/v1/functions", json=create_body("twice"))

    assert response.status_code == 409
    assert response.json()["type"] == "ResourceConflictException"


# Reading and listing.


def test_get_returns_what_create_returned(tenant: Tenant) -> None:
    created = tenant.deploy("fetched", RETURNS_ONE, environment={"A": "b"}, memory_mb=192)

    response = tenant.http.get("/v1/functions/fetched")

    assert response.status_code == 200
    assert response.json() == created


def test_get_of_a_missing_function_is_not_found(tenant: Tenant) -> None:
    response = tenant.http.get("/v1/functions/nothing-here")

    assert response.status_code == 404
    assert response.json()["type"] == "ResourceNotFound"


def test_list_pages_through_every_function_in_name_order(tenant: Tenant) -> None:
    names = [f"fn-{letter}" for letter in "ecadb"]
    for name in names:
        tenant.deploy(name, RETURNS_ONE)

    pages: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 2}
    while True:
        page = tenant.http.get("/v1/functions", params=params).json()
        pages.append(page)
        if page["next_token"] is None:
            break
        params["next_token"] = page["next_token"]
        assert len(pages) < 10, "pagination does not end"

    assert [len(p["functions"]) for p in pages] == [2, 2, 1]
    listed = [fn["name"] for p in pages for fn in p["functions"]]
    assert listed == sorted(names)
    # The same order as one unpaginated read.
    whole = tenant.http.get("/v1/functions", params={"limit": 100}).json()
    assert [fn["name"] for fn in whole["functions"]] == listed
    assert whole["next_token"] is None


def test_list_with_an_exactly_full_last_page_ends_with_a_null_token(tenant: Tenant) -> None:
    for name in ("p-1", "p-2"):
        tenant.deploy(name, RETURNS_ONE)

    first = tenant.http.get("/v1/functions", params={"limit": 2}).json()

    assert [fn["name"] for fn in first["functions"]] == ["p-1", "p-2"]
    assert first["next_token"] is None


# Changing the configuration.


def test_patch_changes_configuration_and_bumps_the_revision(tenant: Tenant) -> None:
    created = tenant.deploy("tuned", RETURNS_ONE)

    response = tenant.http.patch(
        "/v1/functions/tuned",
        json={
            "memory_mb": 512,
            "timeout_s": 30,
            "environment": {"MODE": "fast"},
            "description": "tuned up",
        },
    )

    assert response.status_code == 200, response.text
    fn = response.json()
    assert (fn["memory_mb"], fn["timeout_s"]) == (512, 30)
    assert fn["environment"] == {"MODE": "fast"}
    assert fn["description"] == "tuned up"
    assert fn["revision"] > created["revision"]
    assert fn["code_sha256"] == created["code_sha256"]
    assert tenant.http.get("/v1/functions/tuned").json() == fn


def test_patch_leaves_unmentioned_fields_alone(tenant: Tenant) -> None:
    created = tenant.deploy("partial", RETURNS_ONE, environment={"KEEP": "me"}, timeout_s=9)

    fn = tenant.http.patch("/v1/functions/partial", json={"memory_mb": 256}).json()

    assert fn["memory_mb"] == 256
    assert fn["environment"] == {"KEEP": "me"}
    assert fn["timeout_s"] == 9
    assert fn["handler"] == created["handler"]


def test_each_patch_bumps_the_revision_again(tenant: Tenant) -> None:
    revisions = [tenant.deploy("bumped", RETURNS_ONE)["revision"]]

    for memory_mb in (256, 384):
        response = tenant.http.patch("/v1/functions/bumped", json={"memory_mb": memory_mb})
        revisions.append(response.json()["revision"])

    assert revisions == sorted(set(revisions))


def test_patch_to_a_handler_whose_file_exists_takes_effect(tenant: Tenant) -> None:
    tenant.deploy("switch", files={"app.py": RETURNS_ONE, "other.py": RETURNS_TWO})
    assert tenant.invoke("switch").json() == "one"

    response = tenant.http.patch("/v1/functions/switch", json={"handler": "other.handler"})

    assert response.status_code == 200, response.text
    assert response.json()["handler"] == "other.handler"
    assert tenant.invoke("switch").json() == "two"


def test_patch_to_a_handler_whose_file_is_missing_changes_nothing(tenant: Tenant) -> None:
    created = tenant.deploy("stay", RETURNS_ONE)

    response = tenant.http.patch(
        "/v1/functions/stay", json={"handler": "missing.handler", "memory_mb": 1024}
    )

    assert response.status_code == 400
    assert response.json()["type"] == "InvalidParameterValueException"
    assert "missing.py" in response.json()["message"]
    assert tenant.http.get("/v1/functions/stay").json() == created


@pytest.mark.parametrize(
    "change",
    [
        {"memory_mb": 10241},
        {"timeout_s": 0},
        {"environment": {"AWS_REGION": "x"}},
        {"name": "renamed"},
        {"code_sha256": "0" * 64},
    ],
)
def test_patch_with_an_invalid_change_is_rejected(tenant: Tenant, change: dict[str, Any]) -> None:
    created = tenant.deploy("strict", RETURNS_ONE)

    response = tenant.http.patch("/v1/functions/strict", json=change)

    assert_validation_error(response)
    assert tenant.http.get("/v1/functions/strict").json() == created


def test_patch_of_a_missing_function_is_not_found(tenant: Tenant) -> None:
    response = tenant.http.patch("/v1/functions/ghost", json={"memory_mb": 256})

    assert response.status_code == 404
    assert response.json()["type"] == "ResourceNotFound"


# Replacing the code.


def code_request(content_type: str, package: bytes) -> dict[str, Any]:
    if content_type == "json":
        return {"json": {"zip_base64": encoded(package)}}
    if content_type == "multipart":
        return {"files": {"code": ("code.zip", package, "application/zip")}}
    return {"content": package, "headers": {"content-type": "application/zip"}}


@pytest.mark.parametrize("content_type", ["json", "multipart", "zip"])
def test_put_code_replaces_the_package(tenant: Tenant, content_type: str) -> None:
    created = tenant.deploy("recoded", RETURNS_ONE)
    assert tenant.invoke("recoded").json() == "one"
    package = make_zip({"app.py": RETURNS_TWO})

    response = tenant.http.put("/v1/functions/recoded/code", **code_request(content_type, package))

    assert response.status_code == 200, response.text
    fn = response.json()
    assert fn["code_sha256"] == hashlib.sha256(package).hexdigest()
    assert fn["code_size"] == len(package)
    assert fn["revision"] > created["revision"]
    assert tenant.invoke("recoded").json() == "two"


def test_put_code_without_a_package_is_a_validation_error(tenant: Tenant) -> None:
    created = tenant.deploy("codeless", RETURNS_ONE)

    response = tenant.http.put("/v1/functions/codeless/code", json={})

    assert_validation_error(response)
    assert "zip_base64" in response.json()["message"]
    assert tenant.http.get("/v1/functions/codeless").json() == created


def test_put_code_of_a_missing_function_is_not_found(tenant: Tenant) -> None:
    package = make_zip({"app.py": RETURNS_TWO})

    response = tenant.http.put("/v1/functions/ghost/code", **code_request("zip", package))

    assert response.status_code == 404
    assert response.json()["type"] == "ResourceNotFound"


# Deleting.


def test_deleted_function_can_no_longer_be_read_or_invoked(tenant: Tenant) -> None:
    tenant.deploy("gone", RETURNS_ONE)
    assert tenant.invoke("gone").status_code == 200

    deleted = tenant.http.delete("/v1/functions/gone")

    assert deleted.status_code == 204
    assert tenant.http.get("/v1/functions/gone").status_code == 404
    invoked = tenant.invoke("gone")
    assert invoked.status_code == 404
    assert invoked.json()["type"] == "ResourceNotFound"
    assert tenant.http.get("/v1/functions").json()["functions"] == []


def test_delete_of_a_missing_function_is_not_found(tenant: Tenant) -> None:
    response = tenant.http.delete("/v1/functions/ghost")

    assert response.status_code == 404
    assert response.json()["type"] == "ResourceNotFound"


def test_deleted_functions_name_can_be_used_again_with_new_code(tenant: Tenant) -> None:
    tenant.deploy("reborn", RETURNS_ONE)
    assert tenant.invoke("reborn").json() == "one"
    tenant.http.delete("/v1/functions/reborn")

    recreated = tenant.deploy("reborn", RETURNS_TWO, memory_mb=256)

    assert recreated["memory_mb"] == 256
    assert tenant.invoke("reborn").json() == "two"
