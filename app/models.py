"""Imports every model so that the metadata (Alembic, tests) sees all tables."""

from app.billing.models import (
    Budget,
    BudgetEvent,
    Invoice,
    InvoiceLine,
    PlanAssignment,
    PricePlan,
    PricePlanVersion,
    ProvisionedConcurrencyChange,
)
from app.db import Base
from app.functions.models import Function
from app.invocations.models import Invocation
from app.metering.models import LateHour, RollupState, UsageHour, UsageMinute, UsageRecord
from app.scheduler.models import ApiProcess, ConcurrencyLease
from app.tenants.models import ApiKey, Tenant
from app.workers.models import WorkerRecord

__all__ = [
    "ApiKey",
    "ApiProcess",
    "Base",
    "Budget",
    "BudgetEvent",
    "ConcurrencyLease",
    "Function",
    "Invocation",
    "Invoice",
    "InvoiceLine",
    "LateHour",
    "PlanAssignment",
    "PricePlan",
    "PricePlanVersion",
    "ProvisionedConcurrencyChange",
    "RollupState",
    "Tenant",
    "UsageHour",
    "UsageMinute",
    "UsageRecord",
    "WorkerRecord",
]
