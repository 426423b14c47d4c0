"""Function configurations and tenant limits for the invoke path, cached.

A change made through this process replaces or drops its entry at once. Entries in use are
reloaded in the background before they expire (app.expiring); the expiry bounds how long another
API process may keep serving the previous revision.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.expiring import ExpiringMap
from workers.protocol import InstanceSpec

FUNCTION_CACHE_TTL_S = 2.0


@dataclass(frozen=True)
class CachedFunction:
    spec: InstanceSpec
    reserved_concurrency: int | None
    provisioned_concurrency: int


@dataclass(frozen=True)
class TenantLimits:
    concurrency_limit: int
    reserved_total: int


class FunctionCache:
    def __init__(self, ttl_s: float = FUNCTION_CACHE_TTL_S) -> None:
        self.functions: ExpiringMap[tuple[str, str], CachedFunction] = ExpiringMap(ttl_s)
        self.tenants: ExpiringMap[str, TenantLimits] = ExpiringMap(ttl_s)

    def put(self, cached: CachedFunction) -> None:
        self.functions.put((cached.spec.tenant_id, cached.spec.function_name), cached)

    def changed(self, cached: CachedFunction) -> None:
        """The function was changed here: serve its new configuration from now on."""
        key = (cached.spec.tenant_id, cached.spec.function_name)
        before = self.functions.get(key)
        self.functions.put(key, cached)
        if before is None or before.reserved_concurrency != cached.reserved_concurrency:
            # The tenant's total of reserved concurrency may have moved with it.
            self.tenants.pop(cached.spec.tenant_id)

    def forget(self, tenant_id: str, name: str) -> None:
        self.functions.pop((tenant_id, name))
        self.tenants.pop(tenant_id)

    def forget_tenant(self, tenant_id: str) -> None:
        self.functions.pop_where(lambda key, _: key[0] == tenant_id)
        self.tenants.pop(tenant_id)
