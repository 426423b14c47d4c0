from __future__ import annotations

import uuid

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from app.auth import OPERATOR_KEY_PREFIX, TENANT_KEY_PREFIX, hash_key, new_key
from app.billing.provisioned import record_provisioned_change
from app.db import utcnow
from app.errors import ResourceConflict, ResourceNotFound
from app.functions.models import Function
from app.functions.service import collect_blob
from app.logging import get_logger
from app.platform import Platform
from app.tenants.models import ApiKey, Tenant

log = get_logger(__name__)


class TenantNotFound(ResourceNotFound):
    pass


class TenantNameTaken(ResourceConflict):
    pass


async def create_tenant(session: AsyncSession, name: str) -> tuple[Tenant, str]:
    """Create a tenant and its first key; the key is returned once and kept only hashed."""
    tenant = Tenant(id=uuid.uuid4().hex, name=name)
    key = new_key(TENANT_KEY_PREFIX)
    session.add(tenant)
    try:
        await session.flush()
        session.add(ApiKey(key_hash=hash_key(key), tenant_id=tenant.id, prefix=key[:10]))
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise TenantNameTaken(f"a tenant named {name!r} already exists", name=name) from None
    log.info("tenant created", tenant_id=tenant.id, tenant=name)
    return tenant, key


async def set_concurrency_limit(session: AsyncSession, tenant_id: str, limit: int | None) -> Tenant:
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise TenantNotFound(f"no tenant with id {tenant_id!r}", tenant_id=tenant_id)
    tenant.concurrency_limit = limit
    await session.commit()
    log.info("tenant concurrency limit changed", tenant_id=tenant_id, limit=limit)
    return tenant


async def list_tenants(session: AsyncSession) -> list[Tenant]:
    return list((await session.execute(select(Tenant).order_by(Tenant.name))).scalars())


async def delete_tenant(platform: Platform, session: AsyncSession, tenant_id: str) -> None:
    """Delete a tenant, its keys and functions, and stop its instances.

    Invocation and usage records stay: they are what the tenant is billed from.
    """
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise TenantNotFound(f"no tenant with id {tenant_id!r}", tenant_id=tenant_id)

    functions = list(
        (await session.execute(select(Function).where(Function.tenant_id == tenant_id))).scalars()
    )
    function_ids = [f.id for f in functions]
    packages = {f.code_sha256 for f in functions}
    for fn in functions:
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
    await session.execute(delete(ApiKey).where(ApiKey.tenant_id == tenant_id))
    await session.execute(delete(Function).where(Function.tenant_id == tenant_id))
    await session.delete(tenant)
    await session.commit()

    platform.keys.forget_tenant(tenant_id)
    platform.functions.forget_tenant(tenant_id)
    for function_id in function_ids:
        await platform.scheduler.retire(function_id)
    # Packages are shared by content across tenants: only those nothing else uses are deleted.
    for sha256 in packages:
        await collect_blob(platform, sha256)
    log.info("tenant deleted", tenant_id=tenant_id, tenant=tenant.name)


async def ensure_operator_key(session: AsyncSession, configured: str | None) -> str | None:
    """Make the operator key match the settings; returns a newly generated key, if any.

    A configured key replaces every other operator key. With none configured, a key is made on
    the first start only and returned so that the caller can print it once. API processes
    starting together race here; the loser of an insert or delete retries against what the
    winner wrote.
    """
    for attempt in range(3):
        try:
            return await _ensure_operator_key(session, configured)
        except (IntegrityError, StaleDataError):
            await session.rollback()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def _ensure_operator_key(session: AsyncSession, configured: str | None) -> str | None:
    existing = list(
        (await session.execute(select(ApiKey).where(ApiKey.is_operator.is_(True)))).scalars()
    )
    if configured:
        wanted = hash_key(configured)
        for row in existing:
            if row.key_hash != wanted:
                await session.delete(row)
        if all(row.key_hash != wanted for row in existing):
            session.add(
                ApiKey(key_hash=wanted, tenant_id=None, is_operator=True, prefix=configured[:10])
            )
        await session.commit()
        return None

    if existing:
        return None
    key = new_key(OPERATOR_KEY_PREFIX)
    session.add(ApiKey(key_hash=hash_key(key), tenant_id=None, is_operator=True, prefix=key[:10]))
    await session.commit()
    return key
