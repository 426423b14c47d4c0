from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, StringConstraints

ResourceName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class TenantCreate(BaseModel):
    name: ResourceName


class TenantOut(BaseModel):
    id: str
    name: str
    created_at: datetime


class TenantCreated(TenantOut):
    api_key: str


class TenantList(BaseModel):
    tenants: list[TenantOut]
