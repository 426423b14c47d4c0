"""Functions: configuration and code, scoped to a tenant."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import fnmatch
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.exc import StaleDataError

from app.billing.provisioned import record_provisioned_change
from app.db import utcnow
from app.errors import InvalidParameterValue, ResourceConflict, ResourceNotFound
from app.functions.cache import CachedFunction, TenantLimits
from app.functions.models import Function
from app.functions.schemas import FunctionConfig, FunctionUpdate
from app.logging import get_logger
from app.packages.errors import PackageTooLarge
from app.packages.images import ImageArchive, read_archive
from app.packages.spool import SpooledPackage, spool_bytes
from app.packages.validation import PackageLimits, inspect_zip
from app.platform import Platform
from app.scheduler.service import ConcurrencyLimits
from app.tenants.models import Tenant
from app.tenants.scope import TenantScope
from workers.protocol import InstanceSpec

log = get_logger(__name__)

UPDATE_ATTEMPTS = 5
# An image archive inside a JSON body is held in memory whole; larger ones go as multipart.
IMAGE_JSON_MAX_BYTES = 64 * 1024 * 1024


@dataclass
class ImagePackage:
    """What an Image function is made from: an uploaded archive, or a reference."""

    archive: SpooledPackage | None = None
    reference: str | None = None

    def discard(self) -> None:
        if self.archive is not None:
            self.archive.discard()


class FunctionNotFound(ResourceNotFound):
    pass


class FunctionNameTaken(ResourceConflict):
    pass


def function_arn(platform: Platform, tenant_id: str, name: str) -> str:
    return f"arn:lambent:lambda:{platform.settings.region}:{tenant_id}:function:{name}"


def to_spec(platform: Platform, fn: Function) -> InstanceSpec:
    return InstanceSpec(
        tenant_id=fn.tenant_id,
        function_id=fn.id,
        function_name=fn.name,
        revision=fn.revision,
        runtime=fn.runtime or "",
        handler=fn.handler,
        memory_mb=fn.memory_mb,
        timeout_s=fn.timeout_s,
        code_sha256=fn.code_sha256,
        environment=dict(fn.environment),
        function_arn=function_arn(platform, fn.tenant_id, fn.name),
        package_type=fn.package_type,
        image=fn.image_uri,
    )


def package_limits(platform: Platform) -> PackageLimits:
    return PackageLimits(
        max_zipped_bytes=platform.settings.max_zipped_bytes,
        max_unzipped_bytes=platform.settings.max_unzipped_bytes,
    )


def upload_dir(platform: Platform) -> Path:
    path = platform.settings.data_dir / "uploads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def too_large(platform: Platform) -> PackageTooLarge:
    return PackageTooLarge(
        f"the zip package is larger than {platform.settings.max_zipped_bytes} bytes; "
        "that is the limit for a package"
    )


def spool_base64(platform: Platform, encoded: str) -> SpooledPackage:
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameterValue("code.zip_base64 is not valid base64") from None
    return spool_bytes(data, upload_dir(platform), max_bytes=platform.settings.max_zipped_bytes)


def image_package(platform: Platform, reference: str | None, encoded: str | None) -> ImagePackage:
    """The image of a JSON request: a reference, or an archive in base64 spooled to disk."""
    if reference is not None:
        return ImagePackage(reference=reference)
    try:
        data = base64.b64decode(encoded or "", validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameterValue("image.archive_base64 is not valid base64") from None
    limit = min(platform.settings.max_image_bytes, IMAGE_JSON_MAX_BYTES)
    return ImagePackage(archive=spool_bytes(data, upload_dir(platform), max_bytes=limit))


def image_too_large(platform: Platform) -> PackageTooLarge:
    limit = platform.settings.max_image_bytes
    return PackageTooLarge(
        f"The image archive is larger than the limit of {limit} bytes.", limit_bytes=limit
    )


def _require_image_workers(platform: Platform) -> None:
    if not any(
        getattr(worker, "sandbox", None) == "docker" for worker in platform.scheduler.workers
    ):
        raise InvalidParameterValue(
            "Container images run only on workers of the Docker sandbox, and this platform has "
            "none: its operator can start workers with LAMBENT_SANDBOX=docker."
        )


async def _accept_image(platform: Platform, image: ImagePackage) -> ImageArchive | None:
    """Check an Image function's image; an uploaded archive is stored, rewritten without names.

    The caller discards the archive returned once the function is committed.
    """
    _require_image_workers(platform)
    if image.archive is None:
        assert image.reference is not None
        await _check_reference(platform, image.reference)
        return None
    archive = await asyncio.to_thread(read_archive, image.archive.path, upload_dir(platform))
    try:
        await platform.store.put_file(archive.sha256, archive.path)
    except BaseException:
        archive.discard()
        raise
    return archive


async def _check_reference(platform: Platform, reference: str) -> None:
    patterns = [p.strip() for p in platform.settings.image_reference_patterns.split(",")]
    if not any(pattern and fnmatch.fnmatchcase(reference, pattern) for pattern in patterns):
        raise InvalidParameterValue(
            f"Image {reference!r} is not one that functions may use; the operator allows "
            f"{', '.join(p for p in patterns if p) or 'none'}.",
            image=reference,
        )
    # Only the embedded worker can be asked; remote ones report a missing image when they
    # start the function (Lambent.ImageNotFound).
    worker = platform.worker
    has_image = getattr(worker.backend, "has_image", None) if worker is not None else None
    if has_image is not None and not await has_image(reference):
        raise InvalidParameterValue(f"No image {reference!r} is on the workers.", image=reference)


async def _accept_package(
    platform: Platform, package: SpooledPackage, runtime: str, handler: str
) -> None:
    """Validate a spooled package and put it in the object store."""
    await asyncio.to_thread(
        inspect_zip, package.path, runtime=runtime, handler=handler, limits=package_limits(platform)
    )
    await platform.store.put_file(package.sha256, package.path)


async def _check_handler(platform: Platform, sha256: str, runtime: str, handler: str) -> None:
    """Re-validate a stored package against a changed runtime or handler."""
    fd, tmp = tempfile.mkstemp(dir=upload_dir(platform), prefix="check-")
    os.close(fd)
    try:
        await platform.store.get_to_file(sha256, Path(tmp))
        await asyncio.to_thread(
            inspect_zip,
            Path(tmp),
            runtime=runtime,
            handler=handler,
            limits=package_limits(platform),
        )
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


async def collect_blob(platform: Platform, sha256: str) -> None:
    """Delete a package blob that no function refers to any more."""
    if not sha256:  # an image given by reference has none
        return
    async with platform.db.sessionmaker() as session:
        refs = await session.scalar(
            select(func.count()).select_from(Function).where(Function.code_sha256 == sha256)
        )
    if not refs:
        await platform.store.delete(sha256)


async def _ensure_blob(platform: Platform, package: SpooledPackage | ImageArchive) -> None:
    # A concurrent delete may have collected the blob between our put and our commit (it saw
    # no reference yet); putting it again closes that window.
    if not await platform.store.exists(package.sha256):
        await platform.store.put_file(package.sha256, package.path)


async def _accept(
    platform: Platform, config: FunctionConfig, package: SpooledPackage | ImagePackage
) -> tuple[SpooledPackage | ImageArchive | None, dict[str, object]]:
    """Check and store a new package; the stored file (if any) and the columns it sets."""
    if isinstance(package, ImagePackage):
        if config.package_type != "Image":
            raise InvalidParameterValue("a container image is for package_type Image only")
        archive = await _accept_image(platform, package)
        columns = {
            "code_sha256": archive.sha256 if archive else "",
            "code_size": archive.size if archive else 0,
            "image_uri": archive.image_id if archive else package.reference,
        }
        return archive, columns
    if config.package_type != "Zip" or config.runtime is None or config.handler is None:
        raise InvalidParameterValue("a zip package is for package_type Zip only")
    await _accept_package(platform, package, config.runtime, config.handler)
    return package, {"code_sha256": package.sha256, "code_size": package.size, "image_uri": None}


async def create_function(
    platform: Platform,
    tenant_id: str,
    config: FunctionConfig,
    package: SpooledPackage | ImagePackage,
) -> Function:
    scope = TenantScope(tenant_id)
    stored: SpooledPackage | ImageArchive | None = None
    try:
        async with platform.db.sessionmaker() as session:
            taken = await session.scalar(
                scope.select(Function, Function.id).where(Function.name == config.name)
            )
            if taken is not None:
                raise FunctionNameTaken(
                    f"a function named {config.name!r} already exists", name=config.name
                )
            stored, columns = await _accept(platform, config, package)

            now = utcnow()
            fn = Function(
                id=uuid.uuid4().hex,
                tenant_id=tenant_id,
                name=config.name,
                package_type=config.package_type,
                runtime=config.runtime,
                handler=config.handler or "",
                memory_mb=config.memory_mb,
                timeout_s=config.timeout_s,
                environment=config.environment,
                description=config.description,
                created_at=now,
                updated_at=now,
                **columns,
            )
            session.add(fn)
            try:
                await session.commit()
            except IntegrityError:
                await session.rollback()
                await collect_blob(platform, fn.code_sha256)
                raise FunctionNameTaken(
                    f"a function named {config.name!r} already exists", name=config.name
                ) from None
            if stored is not None:
                await _ensure_blob(platform, stored)
    finally:
        package.discard()
        if isinstance(stored, ImageArchive):
            stored.discard()
    log.info("function created", tenant_id=tenant_id, function=fn.name, code_sha256=fn.code_sha256)
    return fn


async def get_function(platform: Platform, tenant_id: str, name: str) -> Function:
    async with platform.db.sessionmaker() as session:
        fn = await session.scalar(
            TenantScope(tenant_id).select(Function).where(Function.name == name)
        )
    if fn is None:
        raise FunctionNotFound(f"function {name!r} does not exist", name=name)
    return fn


def to_cached(platform: Platform, fn: Function) -> CachedFunction:
    return CachedFunction(
        spec=to_spec(platform, fn),
        reserved_concurrency=fn.reserved_concurrency,
        provisioned_concurrency=fn.provisioned_concurrency,
    )


async def get_cached(platform: Platform, tenant_id: str, name: str) -> CachedFunction:
    """The function as the invoke path needs it, from the cache when fresh."""
    cache = platform.functions.functions
    key = (tenant_id, name)
    cached = cache.fresh(key, lambda: _load_cached(platform, tenant_id, name))
    if cached is None:
        cached = to_cached(platform, await get_function(platform, tenant_id, name))
        cache.put(key, cached)
    return cached


async def _load_cached(platform: Platform, tenant_id: str, name: str) -> CachedFunction | None:
    try:
        return to_cached(platform, await get_function(platform, tenant_id, name))
    except FunctionNotFound:
        return None


async def concurrency_limits(
    platform: Platform, tenant_id: str, cached: CachedFunction
) -> ConcurrencyLimits:
    cache = platform.functions.tenants
    limits = cache.fresh(tenant_id, lambda: _load_tenant_limits(platform, tenant_id))
    if limits is None:
        limits = await _load_tenant_limits(platform, tenant_id)
        cache.put(tenant_id, limits)
    return ConcurrencyLimits(
        tenant_limit=limits.concurrency_limit,
        reserved=cached.reserved_concurrency,
        tenant_reserved_total=limits.reserved_total,
    )


async def _load_tenant_limits(platform: Platform, tenant_id: str) -> TenantLimits:
    async with platform.db.sessionmaker() as session:
        tenant_limit = await session.scalar(
            select(Tenant.concurrency_limit).where(Tenant.id == tenant_id)
        )
        reserved_total = await session.scalar(
            TenantScope(tenant_id).select(
                Function, func.coalesce(func.sum(Function.reserved_concurrency), 0)
            )
        )
    return TenantLimits(
        concurrency_limit=(
            tenant_limit if tenant_limit is not None else platform.settings.tenant_concurrency_limit
        ),
        reserved_total=int(reserved_total or 0),
    )


async def _set_concurrency_columns(
    platform: Platform, tenant_id: str, name: str, values: dict[str, int | None]
) -> Function:
    # A plain UPDATE, not the ORM: concurrency settings do not change what an instance runs,
    # so they must not bump the revision (which would retire every warm instance).
    async with platform.db.sessionmaker() as session:
        fn = await session.scalar(
            TenantScope(tenant_id).select(Function).where(Function.name == name)
        )
        if fn is None:
            raise FunctionNotFound(f"function {name!r} does not exist", name=name)
        await session.execute(update(Function).where(Function.id == fn.id).values(**values))
        count = values.get("provisioned_concurrency")
        if count is not None and count != fn.provisioned_concurrency:
            # Billed from this history; it commits with the setting or not at all.
            await record_provisioned_change(
                session,
                tenant_id=tenant_id,
                function_id=fn.id,
                function_name=fn.name,
                memory_mb=fn.memory_mb,
                count=count,
                at=utcnow(),
            )
        await session.commit()
        await session.refresh(fn)
    platform.functions.changed(to_cached(platform, fn))
    return fn


async def set_reserved_concurrency(
    platform: Platform, tenant_id: str, name: str, reserved: int | None
) -> Function:
    """Reserve concurrency for a function (None removes the reservation; 0 throttles it)."""
    if reserved is not None:
        current = await get_function(platform, tenant_id, name)
        limits = await concurrency_limits(platform, tenant_id, to_cached(platform, current))
        others = limits.tenant_reserved_total - (current.reserved_concurrency or 0)
        if others + reserved > limits.tenant_limit:
            raise InvalidParameterValue(
                f"reserving {reserved} would leave the tenant's other functions "
                f"{limits.tenant_limit - others - reserved} of its limit of "
                f"{limits.tenant_limit}; at most {limits.tenant_limit - others} can be reserved",
                name=name,
            )
    fn = await _set_concurrency_columns(
        platform, tenant_id, name, {"reserved_concurrency": reserved}
    )
    log.info("reserved concurrency changed", tenant_id=tenant_id, function=name, value=reserved)
    return fn


async def set_provisioned_concurrency(
    platform: Platform, tenant_id: str, name: str, count: int
) -> Function:
    """Keep ``count`` instances of the function initialised (0 turns it off)."""
    current = await get_function(platform, tenant_id, name)
    if current.reserved_concurrency is not None and count > current.reserved_concurrency:
        raise InvalidParameterValue(
            f"provisioned concurrency {count} is over the function's reserved concurrency "
            f"{current.reserved_concurrency}",
            name=name,
        )
    fn = await _set_concurrency_columns(
        platform, tenant_id, name, {"provisioned_concurrency": count}
    )
    platform.scheduler.set_provisioned(to_spec(platform, fn), count)
    await platform.scheduler.ensure_provisioned()
    log.info("provisioned concurrency changed", tenant_id=tenant_id, function=name, value=count)
    return fn


async def restore_provisioned(platform: Platform) -> None:
    """Hand the scheduler every function's provisioned concurrency, after a restart."""
    async with platform.db.sessionmaker() as session:
        rows = (
            await session.execute(select(Function).where(Function.provisioned_concurrency > 0))
        ).scalars()
        for fn in rows:
            platform.scheduler.set_provisioned(to_spec(platform, fn), fn.provisioned_concurrency)


async def list_functions(
    platform: Platform, tenant_id: str, *, limit: int, after: str | None
) -> tuple[list[Function], str | None]:
    query = TenantScope(tenant_id).select(Function).order_by(Function.name).limit(limit + 1)
    if after is not None:
        query = query.where(Function.name > after)
    async with platform.db.sessionmaker() as session:
        rows = list((await session.execute(query)).scalars())
    if len(rows) > limit:
        return rows[:limit], rows[limit - 1].name
    return rows, None


async def _apply_update(
    platform: Platform, tenant_id: str, name: str, changes: dict[str, object]
) -> Function:
    """Apply changes under the optimistic revision check, retrying on a concurrent update."""
    for attempt in range(UPDATE_ATTEMPTS):
        async with platform.db.sessionmaker() as session:
            fn = await session.scalar(
                TenantScope(tenant_id).select(Function).where(Function.name == name)
            )
            if fn is None:
                raise FunctionNotFound(f"function {name!r} does not exist", name=name)
            memory_before = fn.memory_mb
            for field, value in changes.items():
                setattr(fn, field, value)
            fn.updated_at = utcnow()
            if fn.provisioned_concurrency and fn.memory_mb != memory_before:
                # Provisioned concurrency is billed by memory: a new size starts a new stretch.
                await record_provisioned_change(
                    session,
                    tenant_id=tenant_id,
                    function_id=fn.id,
                    function_name=fn.name,
                    memory_mb=fn.memory_mb,
                    count=fn.provisioned_concurrency,
                    at=fn.updated_at,
                )
            try:
                await session.commit()
            except StaleDataError:
                await session.rollback()
                if attempt == UPDATE_ATTEMPTS - 1:
                    raise ResourceConflict(
                        f"function {name!r} is being changed concurrently; retry", name=name
                    ) from None
                continue
        platform.functions.changed(to_cached(platform, fn))
        await platform.scheduler.retire(fn.id, fn.revision)
        if fn.provisioned_concurrency:
            platform.scheduler.set_provisioned(to_spec(platform, fn), fn.provisioned_concurrency)
        return fn
    raise AssertionError("unreachable")


async def update_configuration(
    platform: Platform, tenant_id: str, name: str, update: FunctionUpdate
) -> Function:
    changes = update.model_dump(exclude_unset=True, exclude_none=True)
    current = await get_function(platform, tenant_id, name)
    if not changes:
        return current
    if current.package_type == "Image":
        if "runtime" in changes:
            raise InvalidParameterValue(
                "an Image function has no runtime: its image brings its own", name=name
            )
    else:
        runtime = str(changes.get("runtime", current.runtime))
        handler = str(changes.get("handler", current.handler))
        if (runtime, handler) != (current.runtime, current.handler):
            await _check_handler(platform, current.code_sha256, runtime, handler)
    fn = await _apply_update(platform, tenant_id, name, changes)
    log.info("function configuration changed", tenant_id=tenant_id, function=name)
    return fn


async def update_code(
    platform: Platform, tenant_id: str, name: str, package: SpooledPackage | ImagePackage
) -> Function:
    """New code: a zip for a Zip function, an image for an Image one."""
    stored: SpooledPackage | ImageArchive | None = None
    try:
        current = await get_function(platform, tenant_id, name)
        config = FunctionConfig(
            name=current.name,
            package_type=current.package_type,  # type: ignore[arg-type]
            runtime=current.runtime,  # type: ignore[arg-type]
            handler=current.handler or None,
        )
        stored, columns = await _accept(platform, config, package)
        fn = await _apply_update(platform, tenant_id, name, columns)
        if stored is not None:
            await _ensure_blob(platform, stored)
    finally:
        package.discard()
        if isinstance(stored, ImageArchive):
            stored.discard()
    if current.code_sha256 != fn.code_sha256:
        await collect_blob(platform, current.code_sha256)
    log.info(
        "function code changed", tenant_id=tenant_id, function=name, code_sha256=fn.code_sha256
    )
    return fn


async def delete_function(platform: Platform, tenant_id: str, name: str) -> None:
    async with platform.db.sessionmaker() as session:
        fn = await session.scalar(
            TenantScope(tenant_id).select(Function).where(Function.name == name)
        )
        if fn is None:
            raise FunctionNotFound(f"function {name!r} does not exist", name=name)
        if fn.provisioned_concurrency:
            await record_provisioned_change(
                session,
                tenant_id=tenant_id,
                function_id=fn.id,
                function_name=fn.name,
                memory_mb=fn.memory_mb,
                count=0,
                at=utcnow(),
            )
        await session.delete(fn)
        await session.commit()
    platform.functions.forget(tenant_id, name)
    await platform.scheduler.retire(fn.id)
    await collect_blob(platform, fn.code_sha256)
    log.info("function deleted", tenant_id=tenant_id, function=name)
