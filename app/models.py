"""Imports every model so that the metadata (Alembic, tests) sees all tables."""

from app.db import Base
from app.functions.models import Function
from app.invocations.models import Invocation
from app.metering.models import UsageRecord
from app.tenants.models import ApiKey, Tenant
from app.workers.models import WorkerRecord

__all__ = ["ApiKey", "Base", "Function", "Invocation", "Tenant", "UsageRecord", "WorkerRecord"]
