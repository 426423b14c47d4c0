"""Bearer keys: who is calling. Keys are random, shown once, and kept only as SHA-256."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select

from app.errors import AccessDenied, Unauthorized
from app.expiring import ExpiringMap
from app.platform import Platform, get_platform
from app.tenants.models import ApiKey

TENANT_KEY_PREFIX = "lmb_"
OPERATOR_KEY_PREFIX = "lmbop_"
KEY_CACHE_TTL_S = 10.0

bearer = HTTPBearer(auto_error=False, description="A tenant key, or the operator key")


@dataclass(frozen=True)
class Principal:
    tenant_id: str | None
    is_operator: bool


def new_key(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyCache(ExpiringMap[str, Principal]):
    """Resolved keys by hash, so that the invoke path does not read the database."""

    def __init__(self, ttl_s: float = KEY_CACHE_TTL_S) -> None:
        super().__init__(ttl_s)

    def forget_tenant(self, tenant_id: str) -> None:
        self.pop_where(lambda _, principal: principal.tenant_id == tenant_id)


async def authenticate(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    platform: Platform = Depends(get_platform),
) -> Principal:
    return await resolve_key(platform, credentials.credentials if credentials else None)


async def resolve_key(platform: Platform, key: str | None) -> Principal:
    """Who holds ``key``; ``Unauthorized`` if nobody does."""
    if not key:
        raise Unauthorized("send the API key as 'Authorization: Bearer <key>'")

    key_hash = hash_key(key)
    principal = platform.keys.fresh(key_hash, lambda: _load_principal(platform, key_hash))
    if principal is None:
        principal = await _load_principal(platform, key_hash)
        if principal is None:
            raise Unauthorized("the API key is not valid")
        platform.keys.put(key_hash, principal)
    return principal


async def _load_principal(platform: Platform, key_hash: str) -> Principal | None:
    async with platform.db.sessionmaker() as session:
        row = (
            await session.execute(select(ApiKey).where(ApiKey.key_hash == key_hash))
        ).scalar_one_or_none()
    return None if row is None else Principal(tenant_id=row.tenant_id, is_operator=row.is_operator)


async def require_tenant(principal: Principal = Depends(authenticate)) -> str:
    """The calling tenant's id; the operator key is not a tenant."""
    return tenant_of(principal)


def tenant_of(principal: Principal) -> str:
    if principal.tenant_id is None:
        raise AccessDenied("this route needs a tenant's key, not the operator key")
    return principal.tenant_id


async def require_operator(principal: Principal = Depends(authenticate)) -> Principal:
    if not principal.is_operator:
        raise AccessDenied("this route needs the operator key")
    return principal
