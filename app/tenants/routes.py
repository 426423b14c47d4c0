from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from app.auth import Principal, require_operator
from app.platform import Platform, get_platform
from app.tenants import service
from app.tenants.models import Tenant
from app.tenants.schemas import TenantCreate, TenantCreated, TenantList, TenantOut, TenantUpdate

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])


def tenant_out(platform: Platform, tenant: Tenant) -> TenantOut:
    limit = tenant.concurrency_limit
    return TenantOut(
        id=tenant.id,
        name=tenant.name,
        concurrency_limit=platform.settings.tenant_concurrency_limit if limit is None else limit,
        created_at=tenant.created_at,
    )


@router.post("", status_code=201, response_model=TenantCreated)
async def create_tenant(
    body: TenantCreate,
    _: Principal = Depends(require_operator),
    platform: Platform = Depends(get_platform),
) -> TenantCreated:
    """Create a tenant. Its API key is in this response only."""
    async with platform.db.sessionmaker() as session:
        tenant, key = await service.create_tenant(session, body.name)
    return TenantCreated(**tenant_out(platform, tenant).model_dump(), api_key=key)


@router.get("", response_model=TenantList)
async def list_tenants(
    _: Principal = Depends(require_operator), platform: Platform = Depends(get_platform)
) -> TenantList:
    """List every tenant."""
    async with platform.db.sessionmaker() as session:
        tenants = await service.list_tenants(session)
    return TenantList(tenants=[tenant_out(platform, t) for t in tenants])


@router.patch("/{tenant_id}", response_model=TenantOut)
async def update_tenant(
    tenant_id: str,
    body: TenantUpdate,
    _: Principal = Depends(require_operator),
    platform: Platform = Depends(get_platform),
) -> TenantOut:
    """Change a tenant's concurrency limit."""
    async with platform.db.sessionmaker() as session:
        tenant = await service.set_concurrency_limit(session, tenant_id, body.concurrency_limit)
    platform.functions.forget_tenant(tenant_id)
    return tenant_out(platform, tenant)


@router.delete("/{tenant_id}", status_code=204, response_class=Response)
async def delete_tenant(
    tenant_id: str,
    _: Principal = Depends(require_operator),
    platform: Platform = Depends(get_platform),
) -> Response:
    """Delete a tenant with its keys and functions; its usage records are kept."""
    async with platform.db.sessionmaker() as session:
        await service.delete_tenant(platform, session, tenant_id)
    return Response(status_code=204)
