from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

ResourceName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class TenantCreate(BaseModel):
    name: ResourceName


class TenantOut(BaseModel):
    id: str
    name: str
    concurrency_limit: int = Field(description="Concurrent invocations the tenant may run")
    created_at: datetime


class TenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    concurrency_limit: int | None = Field(
        None, ge=0, le=100_000, description="null returns to the platform's default"
    )


class TenantCreated(TenantOut):
    api_key: str


class TenantList(BaseModel):
    tenants: list[TenantOut]
