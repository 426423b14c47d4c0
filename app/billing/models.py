from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.billing.money import ExactDecimal, format_decimal
from app.db import Base, UTCDateTime, utcnow


class PricePlan(Base):
    """A named plan; its prices live in versions, each in force from a time on."""

    __tablename__ = "price_plans"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3))
    minor_units: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PricePlanVersion(Base):
    """A plan's prices from ``effective_from`` until its next version. Never changed."""

    __tablename__ = "price_plan_versions"
    __table_args__ = (
        UniqueConstraint("plan", "effective_from", name="uq_price_plan_versions_plan_from"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    plan: Mapped[str] = mapped_column(ForeignKey("price_plans.name", ondelete="CASCADE"))
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime)
    request_price_per_million: Mapped[Decimal] = mapped_column(ExactDecimal)
    gb_second_price: Mapped[Decimal] = mapped_column(ExactDecimal)
    # [{"above_gb_seconds": "6000000000", "gb_second_price": "0.000015"}, ...] as strings.
    tiers: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    free_requests: Mapped[int] = mapped_column(BigInteger)
    free_gb_seconds: Mapped[Decimal] = mapped_column(ExactDecimal)
    provisioned_gb_second_price: Mapped[Decimal] = mapped_column(ExactDecimal)
    provisioned_duration_gb_second_price: Mapped[Decimal] = mapped_column(ExactDecimal)
    bill_init: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PlanAssignment(Base):
    """A tenant is on ``plan`` from ``effective_from`` until its next assignment.

    No foreign key to tenants: a deleted tenant's usage is still billed, by the plan it was on.
    """

    __tablename__ = "plan_assignments"
    __table_args__ = (
        UniqueConstraint("tenant_id", "effective_from", name="uq_plan_assignments_tenant_from"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(32))
    plan: Mapped[str] = mapped_column(ForeignKey("price_plans.name"))
    effective_from: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Invoice(Base):
    """A finalised invoice: written once, when its period has ended, and never changed."""

    __tablename__ = "invoices"
    __table_args__ = (
        UniqueConstraint("tenant_id", "period_start", name="uq_invoices_tenant_period"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(32))
    period_start: Mapped[datetime] = mapped_column(UTCDateTime)
    period_end: Mapped[datetime] = mapped_column(UTCDateTime)
    currency: Mapped[str] = mapped_column(String(3))
    minor_units: Mapped[int] = mapped_column(Integer)
    plans: Mapped[list[str]] = mapped_column(JSON)
    requests: Mapped[int] = mapped_column(BigInteger)
    billed_ms: Mapped[int] = mapped_column(BigInteger)
    total: Mapped[Decimal] = mapped_column(ExactDecimal)
    exact_total: Mapped[Decimal] = mapped_column(ExactDecimal)
    finalised_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    lines: Mapped[list[InvoiceLine]] = relationship(
        order_by="InvoiceLine.position", lazy="selectin", cascade="all, delete-orphan"
    )


class InvoiceLine(Base):
    __tablename__ = "invoice_lines"

    invoice_id: Mapped[str] = mapped_column(
        ForeignKey("invoices.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    function_name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    requests: Mapped[int] = mapped_column(BigInteger)
    billed_ms: Mapped[int] = mapped_column(BigInteger)
    init_billed_ms: Mapped[int] = mapped_column(BigInteger)
    gb_seconds: Mapped[Decimal] = mapped_column(ExactDecimal)
    free_requests: Mapped[int] = mapped_column(BigInteger)
    free_gb_seconds: Mapped[Decimal] = mapped_column(ExactDecimal)
    exact_amount: Mapped[Decimal] = mapped_column(ExactDecimal)
    amount: Mapped[Decimal] = mapped_column(ExactDecimal)


class Budget(Base):
    """A tenant's monthly budget, in the currency of its plan."""

    __tablename__ = "budgets"

    tenant_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    amount: Mapped[Decimal] = mapped_column(ExactDecimal)
    hard_cap: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BudgetEvent(Base):
    """A budget threshold crossed: once per period, threshold and budget amount."""

    __tablename__ = "budget_events"
    __table_args__ = (
        UniqueConstraint(
            "tenant_id",
            "period_start",
            "threshold_percent",
            "budget_amount",
            name="uq_budget_events_crossing",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(32))
    period_start: Mapped[datetime] = mapped_column(UTCDateTime)
    threshold_percent: Mapped[int] = mapped_column(Integer)
    budget_amount: Mapped[Decimal] = mapped_column(ExactDecimal)
    spent: Mapped[Decimal] = mapped_column(ExactDecimal)
    currency: Mapped[str] = mapped_column(String(3))
    hard_cap: Mapped[bool] = mapped_column(Boolean)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ProvisionedConcurrencyChange(Base):
    """A function's provisioned concurrency from ``at`` on (0 = off), as the scheduler set it."""

    __tablename__ = "provisioned_concurrency_changes"
    __table_args__ = (Index("ix_provisioned_concurrency_changes_tenant_at", "tenant_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(32))
    function_id: Mapped[str] = mapped_column(String(32))
    function_name: Mapped[str] = mapped_column(String(64))
    memory_mb: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime)


def tiers_json(tiers: list[Any]) -> list[dict[str, str]]:
    return [
        {
            "above_gb_seconds": format_decimal(t.above_gb_seconds),
            "gb_second_price": format_decimal(t.gb_second_price),
        }
        for t in tiers
    ]
