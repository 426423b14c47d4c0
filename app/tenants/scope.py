"""The one place that limits queries to a tenant.

Every read of tenant data starts from ``TenantScope.select``; no route or service writes a
tenant filter by hand. Another tenant's rows are therefore simply absent, and the caller answers
404, never 403.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, select

M = TypeVar("M")


class TenantScope:
    def __init__(self, tenant_id: str) -> None:
        self.tenant_id = tenant_id

    def select(self, model: type[M], *columns: Any) -> Select[Any]:
        query = select(*columns) if columns else select(model)
        return query.where(model.tenant_id == self.tenant_id)  # type: ignore[attr-defined]
