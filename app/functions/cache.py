"""Function configurations for the invoke path, cached for a moment.

A change made through this process invalidates its entry at once; the short expiry bounds how
long another API process may keep serving the previous revision.
"""

from __future__ import annotations

import time

from workers.protocol import InstanceSpec

FUNCTION_CACHE_TTL_S = 2.0


class FunctionCache:
    def __init__(self, ttl_s: float = FUNCTION_CACHE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[tuple[str, str], tuple[InstanceSpec, float]] = {}

    def get(self, tenant_id: str, name: str) -> InstanceSpec | None:
        entry = self._entries.get((tenant_id, name))
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def put(self, spec: InstanceSpec) -> None:
        if len(self._entries) > 100_000:
            self._entries.clear()
        self._entries[(spec.tenant_id, spec.function_name)] = (
            spec,
            time.monotonic() + self.ttl_s,
        )

    def forget(self, tenant_id: str, name: str) -> None:
        self._entries.pop((tenant_id, name), None)

    def forget_tenant(self, tenant_id: str) -> None:
        for key in [k for k in self._entries if k[0] == tenant_id]:
            del self._entries[key]
