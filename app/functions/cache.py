"""Function configurations for the invoke path, cached for a moment.

A change made through this process invalidates its entry at once; the short expiry bounds how
long another API process may keep serving the previous revision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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
        self.ttl_s = ttl_s
        self._entries: dict[tuple[str, str], tuple[CachedFunction, float]] = {}
        self._tenants: dict[str, tuple[TenantLimits, float]] = {}

    def get(self, tenant_id: str, name: str) -> CachedFunction | None:
        entry = self._entries.get((tenant_id, name))
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, cached: CachedFunction) -> None:
        if len(self._entries) > 100_000:
            self._entries.clear()
        key = (cached.spec.tenant_id, cached.spec.function_name)
        self._entries[key] = (cached, time.monotonic() + self.ttl_s)

    def tenant_limits(self, tenant_id: str) -> TenantLimits | None:
        entry = self._tenants.get(tenant_id)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put_tenant_limits(self, tenant_id: str, limits: TenantLimits) -> None:
        if len(self._tenants) > 100_000:
            self._tenants.clear()
        self._tenants[tenant_id] = (limits, time.monotonic() + self.ttl_s)

    def forget(self, tenant_id: str, name: str) -> None:
        self._entries.pop((tenant_id, name), None)
        self._tenants.pop(tenant_id, None)

    def forget_tenant(self, tenant_id: str) -> None:
        for key in [k for k in self._entries if k[0] == tenant_id]:
            del self._entries[key]
        self._tenants.pop(tenant_id, None)
