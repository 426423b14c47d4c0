from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, TypeAdapter
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from app.auth import require_tenant
from app.errors import InvalidParameterValue, InvalidRequestContent
from app.functions import service
from app.functions.models import Function
from app.functions.schemas import (
    CodeZip,
    FunctionConfig,
    FunctionCreate,
    FunctionList,
    FunctionOut,
    FunctionUpdate,
    ImageSource,
    InstanceList,
    InstanceOut,
    ProvisionedConcurrencyConfig,
    ProvisionedConcurrencyOut,
    ReservedConcurrency,
)
from app.http import limited_request, read_limited
from app.packages.errors import PackageTooLarge
from app.packages.spool import SpooledPackage, spool_stream
from app.platform import Platform, get_platform
from app.tenants.schemas import ResourceName
from workers.protocol import WorkerUnavailable

router = APIRouter(prefix="/v1/functions", tags=["functions"])

# base64 grows a package by a third; the JSON around it is small.
JSON_OVERHEAD_BYTES = 64 * 1024
MULTIPART_FIELDS = (
    "name",
    "package_type",
    "runtime",
    "handler",
    "memory_mb",
    "timeout_s",
    "environment",
    "description",
)


def function_out(platform: Platform, fn: Function) -> FunctionOut:
    return FunctionOut(
        name=fn.name,
        arn=service.function_arn(platform, fn.tenant_id, fn.name),
        package_type=fn.package_type,
        runtime=fn.runtime,
        handler=fn.handler,
        image_uri=fn.image_uri,
        memory_mb=fn.memory_mb,
        timeout_s=fn.timeout_s,
        environment=fn.environment,
        description=fn.description,
        code_sha256=fn.code_sha256,
        code_size=fn.code_size,
        reserved_concurrency=fn.reserved_concurrency,
        provisioned_concurrency=fn.provisioned_concurrency,
        revision=fn.revision,
        created_at=fn.created_at,
        updated_at=fn.updated_at,
    )


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with the models it nests written in place.

    FastAPI copies ``openapi_extra`` as it is and lists only the models of typed parameters and
    responses under components, so a ``$ref`` to a model used only here would point nowhere.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(item) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {**inline(defs[node["$ref"].rsplit("/", 1)[-1]]), **rest}
        return {key: inline(value) for key, value in node.items()}

    return inline(schema)


def _multipart_schema(with_config: bool) -> dict[str, Any]:
    # "code" holds a zip package; "image" a `docker save` archive (package_type Image).
    properties: dict[str, Any] = {
        "code": {"type": "string", "format": "binary"},
        "image": {"type": "string", "format": "binary"},
    }
    required = []
    if with_config:
        for field in MULTIPART_FIELDS:
            properties[field] = {"type": "string"}
        properties["environment"]["description"] = "A JSON object of strings"
        required += ["name"]
    return {"type": "object", "properties": properties, "required": required}


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _multipart(
    request: Request, platform: Platform
) -> tuple[dict[str, str], SpooledPackage | service.ImagePackage]:
    """Parse a multipart upload: plain fields, and the package streamed to disk as it arrives.

    The package is a zip in a file part 'code', or a container image archive in one 'image'.
    """
    settings = platform.settings
    limit = max(settings.max_zipped_bytes, settings.max_image_bytes) + JSON_OVERHEAD_BYTES
    bounded = limited_request(request, limit, service.too_large(platform))
    try:
        async with bounded.form(max_files=1, max_fields=len(MULTIPART_FIELDS)) as form:
            part = next((p for p in ("code", "image") if isinstance(form.get(p), UploadFile)), None)
            if part is None:
                raise InvalidParameterValue(
                    "the multipart body needs the zip as a file part 'code', or a container "
                    "image archive as a file part 'image'"
                )
            upload = form[part]
            assert isinstance(upload, UploadFile)

            async def chunks():  # type: ignore[no-untyped-def]
                while chunk := await upload.read(1024 * 1024):
                    yield chunk

            max_bytes = settings.max_zipped_bytes if part == "code" else settings.max_image_bytes
            try:
                spooled = await spool_stream(
                    chunks(), service.upload_dir(platform), max_bytes=max_bytes
                )
            except PackageTooLarge:
                if part == "code":
                    raise
                raise service.image_too_large(platform) from None
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
    except HTTPException as exc:
        # Starlette answers a malformed or over-long form with a bare 400; callers match on
        # the platform's error types instead.
        raise InvalidRequestContent(f"the multipart body is not valid: {exc.detail}") from None
    if part == "image":
        return fields, service.ImagePackage(archive=spooled)
    return fields, spooled


def _json_limit(platform: Platform) -> int:
    """The largest JSON body with a package in base64 (a third larger than the package)."""
    largest = max(platform.settings.max_zipped_bytes, service.IMAGE_JSON_MAX_BYTES)
    return largest * 4 // 3 + JSON_OVERHEAD_BYTES


CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inline_schema(FunctionCreate)},
            "multipart/form-data": {"schema": _multipart_schema(with_config=True)},
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=FunctionOut,
    openapi_extra=CREATE_BODY,
    responses={409: {"description": "A function of that name exists"}},
)
async def create_function(
    request: Request,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> FunctionOut:
    """Create a function from a zip package or a container image (JSON with base64, or
    multipart for large packages)."""
    package: SpooledPackage | service.ImagePackage
    if _media_type(request) == "multipart/form-data":
        fields, package = await _multipart(request, platform)
        try:
            if "environment" in fields:
                try:
                    fields["environment"] = json.loads(fields["environment"])
                except json.JSONDecodeError:
                    raise InvalidParameterValue("environment must be a JSON object") from None
            config = FunctionConfig.model_validate(fields)
        except BaseException:
            package.discard()
            raise
    else:
        raw = await read_limited(request, _json_limit(platform), service.too_large(platform))
        body = FunctionCreate.model_validate_json(raw or b"{}")
        config = FunctionConfig.model_validate(body.model_dump(exclude={"code", "image"}))
        if body.image is not None:
            package = service.image_package(
                platform, body.image.reference, body.image.archive_base64
            )
        else:
            assert body.code is not None
            package = service.spool_base64(platform, body.code.zip_base64)

    fn = await service.create_function(platform, tenant_id, config, package)
    return function_out(platform, fn)


@router.get("", response_model=FunctionList)
async def list_functions(
    limit: int = Query(50, ge=1, le=1000),
    next_token: str | None = Query(None, description="From the previous page"),
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> FunctionList:
    """List functions by name, a page at a time."""
    rows, next_name = await service.list_functions(
        platform, tenant_id, limit=limit, after=next_token
    )
    return FunctionList(functions=[function_out(platform, fn) for fn in rows], next_token=next_name)


@router.get("/{name}", response_model=FunctionOut)
async def get_function(
    name: ResourceName,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> FunctionOut:
    """A function's configuration and code identity."""
    return function_out(platform, await service.get_function(platform, tenant_id, name))


@router.patch("/{name}", response_model=FunctionOut)
async def update_function(
    name: ResourceName,
    update: FunctionUpdate,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> FunctionOut:
    """Change a function's configuration; new invocations use it at once."""
    fn = await service.update_configuration(platform, tenant_id, name, update)
    return function_out(platform, fn)


CODE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": "A zip for a Zip function, an image for an Image one",
                    "oneOf": [_inline_schema(CodeZip), _inline_schema(ImageSource)],
                }
            },
            "multipart/form-data": {"schema": _multipart_schema(with_config=False)},
            "application/zip": {"schema": {"type": "string", "format": "binary"}},
            "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.put("/{name}/code", response_model=FunctionOut, openapi_extra=CODE_BODY)
async def update_function_code(
    name: ResourceName,
    request: Request,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> FunctionOut:
    """Replace a function's code: a zip for a Zip function (JSON with base64, multipart, or a raw
    application/zip body), an image for an Image one (JSON `{"archive_base64"}` or
    `{"reference"}`, multipart `image`, or a raw application/x-tar body)."""
    media_type = _media_type(request)
    # 404 before reading a large body.
    current = await service.get_function(platform, tenant_id, name)
    image = current.package_type == "Image"
    package: SpooledPackage | service.ImagePackage
    if media_type == "multipart/form-data":
        _, package = await _multipart(request, platform)
    elif media_type in ("application/zip", "application/octet-stream", "application/x-tar"):
        limit = platform.settings.max_image_bytes if image else platform.settings.max_zipped_bytes
        try:
            spooled = await spool_stream(
                request.stream(), service.upload_dir(platform), max_bytes=limit
            )
        except PackageTooLarge:
            if not image:
                raise
            raise service.image_too_large(platform) from None
        package = service.ImagePackage(archive=spooled) if image else spooled
    else:
        raw = await read_limited(request, _json_limit(platform), service.too_large(platform))
        if image:
            source = TypeAdapter(ImageSource).validate_json(raw or b"{}")
            package = service.image_package(platform, source.reference, source.archive_base64)
        else:
            code = TypeAdapter(CodeZip).validate_json(raw or b"{}")
            package = service.spool_base64(platform, code.zip_base64)
    fn = await service.update_code(platform, tenant_id, name, package)
    return function_out(platform, fn)


@router.delete("/{name}", status_code=204, response_class=Response)
async def delete_function(
    name: ResourceName,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> Response:
    """Delete a function and stop its instances; its invocation records stay."""
    await service.delete_function(platform, tenant_id, name)
    return Response(status_code=204)


@router.get("/{name}/concurrency", response_model=ReservedConcurrency | None)
async def get_reserved_concurrency(
    name: ResourceName,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> ReservedConcurrency | None:
    """The function's reserved concurrency, or null when it has none."""
    fn = await service.get_function(platform, tenant_id, name)
    if fn.reserved_concurrency is None:
        return None
    return ReservedConcurrency(reserved_concurrency=fn.reserved_concurrency)


@router.put("/{name}/concurrency", response_model=ReservedConcurrency)
async def put_reserved_concurrency(
    name: ResourceName,
    body: ReservedConcurrency,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> ReservedConcurrency:
    """Reserve concurrency for the function; it also caps it (0 throttles every invocation)."""
    await service.set_reserved_concurrency(platform, tenant_id, name, body.reserved_concurrency)
    return body


@router.delete("/{name}/concurrency", status_code=204, response_class=Response)
async def delete_reserved_concurrency(
    name: ResourceName,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> Response:
    """Remove the reservation: the function shares the tenant's unreserved concurrency."""
    await service.set_reserved_concurrency(platform, tenant_id, name, None)
    return Response(status_code=204)


def _provisioned_out(platform: Platform, fn: Function) -> ProvisionedConcurrencyOut:
    count = fn.provisioned_concurrency
    ready = min(platform.scheduler.provisioned_ready(fn.id), count)
    status = "OFF" if count == 0 else ("READY" if ready >= count else "IN_PROGRESS")
    return ProvisionedConcurrencyOut(provisioned_concurrency=count, ready=ready, status=status)


@router.get("/{name}/provisioned-concurrency", response_model=ProvisionedConcurrencyOut)
async def get_provisioned_concurrency(
    name: ResourceName,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> ProvisionedConcurrencyOut:
    """How many instances are kept initialised, and how many are ready now."""
    return _provisioned_out(platform, await service.get_function(platform, tenant_id, name))


@router.put("/{name}/provisioned-concurrency", response_model=ProvisionedConcurrencyOut)
async def put_provisioned_concurrency(
    name: ResourceName,
    body: ProvisionedConcurrencyConfig,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> ProvisionedConcurrencyOut:
    """Keep N instances initialised and ready; they start in the background."""
    fn = await service.set_provisioned_concurrency(
        platform, tenant_id, name, body.provisioned_concurrency
    )
    return _provisioned_out(platform, fn)


@router.delete("/{name}/provisioned-concurrency", status_code=204, response_class=Response)
async def delete_provisioned_concurrency(
    name: ResourceName,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> Response:
    """Stop keeping instances initialised; warm ones age out with the keep-alive."""
    await service.set_provisioned_concurrency(platform, tenant_id, name, 0)
    return Response(status_code=204)


@router.get("/{name}/instances", response_model=InstanceList)
async def list_instances(
    name: ResourceName,
    tenant_id: str = Depends(require_tenant),
    platform: Platform = Depends(get_platform),
) -> InstanceList:
    """The function's live execution environments, on every worker."""
    fn = await service.get_function(platform, tenant_id, name)
    provisioned = {
        lease.instance_id for lease in platform.scheduler.instances_of(fn.id) if lease.provisioned
    }
    instances: list[InstanceOut] = []
    for worker in list(platform.scheduler.workers):
        try:
            infos = await worker.instances()
        except WorkerUnavailable:
            continue
        for info in infos:
            if info.function_id != fn.id or info.status in ("stopping", "stopped"):
                continue
            instances.append(
                InstanceOut(
                    id=info.instance_id,
                    worker=worker.worker_id,
                    state=str(info.status),
                    provisioned=info.instance_id in provisioned,
                    started_at=datetime.fromtimestamp(info.started_at, UTC),
                    last_used_at=datetime.fromtimestamp(info.last_used_at, UTC),
                    invocations=info.invocations,
                )
            )
    instances.sort(key=lambda i: i.started_at)
    return InstanceList(instances=instances)
