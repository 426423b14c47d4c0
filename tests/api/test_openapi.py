"""The OpenAPI document: every public operation, typed, described and secured by a bearer key."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import Server

PUBLIC_OPERATIONS = [
    ("post", "/v1/tenants"),
    ("get", "/v1/tenants"),
    ("delete", "/v1/tenants/{tenant_id}"),
    ("post", "/v1/functions"),
    ("get", "/v1/functions"),
    ("get", "/v1/functions/{name}"),
    ("patch", "/v1/functions/{name}"),
    ("put", "/v1/functions/{name}/code"),
    ("delete", "/v1/functions/{name}"),
    ("post", "/v1/functions/{name}/invocations"),
    ("get", "/v1/functions/{name}/invocations"),
    ("get", "/v1/invocations/{request_id}"),
    ("get", "/v1/usage"),
]
# Operations that answer 204 with no body.
NO_CONTENT = {("delete", "/v1/tenants/{tenant_id}"), ("delete", "/v1/functions/{name}")}
WITH_BODY = {
    ("post", "/v1/tenants"),
    ("post", "/v1/functions"),
    ("patch", "/v1/functions/{name}"),
    ("put", "/v1/functions/{name}/code"),
    ("post", "/v1/functions/{name}/invocations"),
}
# The invocation event is any JSON the function accepts, so its schema is deliberately open.
OPEN_SCHEMAS = {("post", "/v1/functions/{name}/invocations")}


@pytest.fixture(scope="module")
def spec(server: Server) -> dict[str, Any]:
    with server.client() as client:
        response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = spec
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def operation(spec: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return spec["paths"][path][method]


def properties(spec: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    return set(resolve(spec, schema).get("properties", {}))


def success(op: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    [(status, response)] = [(s, r) for s, r in op["responses"].items() if s.startswith("2")]
    return status, response


@pytest.mark.parametrize(("method", "path"), PUBLIC_OPERATIONS)
def test_every_public_operation_is_documented(spec: dict[str, Any], method: str, path: str) -> None:
    assert method in spec["paths"].get(path, {}), f"{method.upper()} {path} is missing"


def test_every_schema_reference_resolves(spec: dict[str, Any]) -> None:
    refs: list[str] = []

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.append(node["$ref"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(spec)

    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[-1] in spec["components"]["schemas"], ref


@pytest.mark.parametrize(("method", "path"), PUBLIC_OPERATIONS)
def test_every_operation_has_a_description(spec: dict[str, Any], method: str, path: str) -> None:
    # FastAPI derives a summary from the function's name; the description is the route's
    # docstring, which is the only text written for a reader.
    op = operation(spec, method, path)

    assert op.get("summary", "").strip()
    assert op.get("description", "").strip()


@pytest.mark.parametrize(("method", "path"), sorted(WITH_BODY - OPEN_SCHEMAS))
def test_request_bodies_have_typed_schemas(spec: dict[str, Any], method: str, path: str) -> None:
    content = operation(spec, method, path)["requestBody"]["content"]

    for media_type, body in content.items():
        schema = resolve(spec, body["schema"])
        assert schema.get("type") or schema.get("properties"), media_type


def test_invocation_event_is_documented_as_json(spec: dict[str, Any]) -> None:
    body = operation(spec, "post", "/v1/functions/{name}/invocations")["requestBody"]

    assert set(body["content"]) == {"application/json"}
    assert body["content"]["application/json"]["schema"].get("description")


@pytest.mark.parametrize(("method", "path"), sorted(set(PUBLIC_OPERATIONS) - WITH_BODY))
def test_operations_without_input_take_no_body(
    spec: dict[str, Any], method: str, path: str
) -> None:
    assert "requestBody" not in operation(spec, method, path)


@pytest.mark.parametrize(("method", "path"), PUBLIC_OPERATIONS)
def test_success_responses_have_typed_schemas(spec: dict[str, Any], method: str, path: str) -> None:
    status, response = success(operation(spec, method, path))

    if (method, path) in NO_CONTENT:
        assert status == "204"
        assert not response.get("content")
        return
    schema = resolve(spec, response["content"]["application/json"]["schema"])
    assert schema.get("type") == "object"
    assert schema.get("properties")


def test_function_create_offers_json_and_multipart(spec: dict[str, Any]) -> None:
    content = operation(spec, "post", "/v1/functions")["requestBody"]["content"]

    assert set(content) == {"application/json", "multipart/form-data"}
    assert properties(spec, content["application/json"]["schema"]) == {
        "name",
        "package_type",
        "runtime",
        "handler",
        "memory_mb",
        "timeout_s",
        "environment",
        "description",
        "code",
        "image",
    }
    multipart = resolve(spec, content["multipart/form-data"]["schema"])
    assert multipart["properties"]["code"] == {"type": "string", "format": "binary"}
    assert multipart["properties"]["image"] == {"type": "string", "format": "binary"}
    # Which of runtime, handler, code and image a function needs depends on its package type.
    assert "name" in multipart["required"]
    assert {"package_type", "runtime", "handler"} <= set(multipart["properties"])


def test_code_update_offers_json_multipart_and_raw_packages(spec: dict[str, Any]) -> None:
    content = operation(spec, "put", "/v1/functions/{name}/code")["requestBody"]["content"]

    assert set(content) == {
        "application/json",
        "multipart/form-data",
        "application/zip",
        "application/x-tar",
    }
    alternatives = resolve(spec, content["application/json"]["schema"])["oneOf"]
    assert [properties(spec, schema) for schema in alternatives] == [
        {"zip_base64"},
        {"archive_base64", "reference"},
    ]
    assert {"code", "image"} <= properties(spec, content["multipart/form-data"]["schema"])
    assert content["application/zip"]["schema"]["format"] == "binary"
    assert content["application/x-tar"]["schema"]["format"] == "binary"


@pytest.mark.parametrize(
    ("method", "path", "fields"),
    [
        ("post", "/v1/tenants", {"id", "name", "api_key", "created_at"}),
        ("post", "/v1/functions", {"code_sha256", "code_size", "arn", "revision", "memory_mb"}),
        ("get", "/v1/functions", {"functions", "next_token"}),
        ("get", "/v1/usage", {"start", "end", "functions", "total"}),
    ],
)
def test_response_schemas_carry_the_contracts_fields(
    spec: dict[str, Any], method: str, path: str, fields: set[str]
) -> None:
    _, response = success(operation(spec, method, path))

    assert fields <= properties(spec, response["content"]["application/json"]["schema"])


def test_usage_entries_are_typed(spec: dict[str, Any]) -> None:
    _, response = success(operation(spec, "get", "/v1/usage"))
    report = resolve(spec, response["content"]["application/json"]["schema"])
    entry = resolve(spec, report["properties"]["functions"]["items"])

    assert entry["properties"]["function"]["type"] == "string"
    assert entry["properties"]["requests"]["type"] == "integer"
    assert entry["properties"]["billed_ms"]["type"] == "integer"
    assert entry["properties"]["gb_seconds"]["type"] == "number"


@pytest.mark.parametrize(("method", "path"), PUBLIC_OPERATIONS)
def test_errors_are_documented_with_the_error_shape(
    spec: dict[str, Any], method: str, path: str
) -> None:
    responses = operation(spec, method, path)["responses"]

    for status in ("401", "403"):
        schema = resolve(spec, responses[status]["content"]["application/json"]["schema"])
        assert {"type", "message"} <= set(schema["properties"])


def test_bearer_security_scheme_is_declared(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]

    assert [s for s in schemes.values() if s["type"] == "http" and s["scheme"] == "bearer"]


@pytest.mark.parametrize(("method", "path"), PUBLIC_OPERATIONS)
def test_every_operation_requires_the_bearer_key(
    spec: dict[str, Any], method: str, path: str
) -> None:
    schemes = spec["components"]["securitySchemes"]

    names = {name for entry in operation(spec, method, path)["security"] for name in entry}

    assert names
    assert all(schemes[name]["scheme"] == "bearer" for name in names)


def test_health_check_needs_no_key(spec: dict[str, Any]) -> None:
    assert not operation(spec, "get", "/healthz").get("security")
