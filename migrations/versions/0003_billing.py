"""billing

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 16:32:20.426011
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.db

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "budget_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("period_start", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("threshold_percent", sa.Integer(), nullable=False),
        sa.Column("budget_amount", sa.String(length=64), nullable=False),
        sa.Column("spent", sa.String(length=64), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("hard_cap", sa.Boolean(), nullable=False),
        sa.Column("occurred_at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budget_events")),
        sa.UniqueConstraint(
            "tenant_id",
            "period_start",
            "threshold_percent",
            "budget_amount",
            name="uq_budget_events_crossing",
        ),
    )
    op.create_table(
        "budgets",
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("amount", sa.String(length=64), nullable=False),
        sa.Column("hard_cap", sa.Boolean(), nullable=False),
        sa.Column("updated_at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_budgets")),
    )
    op.create_table(
        "invoices",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("period_start", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("period_end", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("minor_units", sa.Integer(), nullable=False),
        sa.Column("plans", sa.JSON(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("billed_ms", sa.BigInteger(), nullable=False),
        sa.Column("total", sa.String(length=64), nullable=False),
        sa.Column("exact_total", sa.String(length=64), nullable=False),
        sa.Column("finalised_at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_invoices")),
        sa.UniqueConstraint("tenant_id", "period_start", name="uq_invoices_tenant_period"),
    )
    op.create_table(
        "price_plans",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("minor_units", sa.Integer(), nullable=False),
        sa.Column("created_at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_price_plans")),
    )
    op.create_table(
        "provisioned_concurrency_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("function_id", sa.String(length=32), nullable=False),
        sa.Column("function_name", sa.String(length=64), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provisioned_concurrency_changes")),
    )
    with op.batch_alter_table("provisioned_concurrency_changes", schema=None) as batch_op:
        batch_op.create_index(
            "ix_provisioned_concurrency_changes_tenant_at", ["tenant_id", "at"], unique=False
        )

    op.create_table(
        "usage_hours",
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("bucket_start", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("function_id", sa.String(length=32), nullable=False),
        sa.Column("function_name", sa.String(length=64), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("billed_ms", sa.BigInteger(), nullable=False),
        sa.Column("mb_ms", sa.BigInteger(), nullable=False),
        sa.Column("init_billed_ms", sa.BigInteger(), nullable=False),
        sa.Column("init_mb_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id", "bucket_start", "function_id", name=op.f("pk_usage_hours")
        ),
    )
    with op.batch_alter_table("usage_hours", schema=None) as batch_op:
        batch_op.create_index("ix_usage_hours_bucket_start", ["bucket_start"], unique=False)

    op.create_table(
        "usage_late_hours",
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("function_id", sa.String(length=32), nullable=False),
        sa.Column("hour", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("until", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id", "function_id", "hour", name=op.f("pk_usage_late_hours")
        ),
    )
    op.create_table(
        "usage_minutes",
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("bucket_start", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("function_id", sa.String(length=32), nullable=False),
        sa.Column("function_name", sa.String(length=64), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("billed_ms", sa.BigInteger(), nullable=False),
        sa.Column("mb_ms", sa.BigInteger(), nullable=False),
        sa.Column("init_billed_ms", sa.BigInteger(), nullable=False),
        sa.Column("init_mb_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id", "bucket_start", "function_id", name=op.f("pk_usage_minutes")
        ),
    )
    with op.batch_alter_table("usage_minutes", schema=None) as batch_op:
        batch_op.create_index("ix_usage_minutes_bucket_start", ["bucket_start"], unique=False)

    op.create_table(
        "usage_rollup_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("minutes_to", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("hours_to", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_rollup_state")),
    )
    op.create_table(
        "invoice_lines",
        sa.Column("invoice_id", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("function_name", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("billed_ms", sa.BigInteger(), nullable=False),
        sa.Column("init_billed_ms", sa.BigInteger(), nullable=False),
        sa.Column("gb_seconds", sa.String(length=64), nullable=False),
        sa.Column("free_requests", sa.BigInteger(), nullable=False),
        sa.Column("free_gb_seconds", sa.String(length=64), nullable=False),
        sa.Column("exact_amount", sa.String(length=64), nullable=False),
        sa.Column("amount", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["invoice_id"],
            ["invoices.id"],
            name=op.f("fk_invoice_lines_invoice_id_invoices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("invoice_id", "position", name=op.f("pk_invoice_lines")),
    )
    op.create_table(
        "plan_assignments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("plan", sa.String(length=64), nullable=False),
        sa.Column("effective_from", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("created_at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["plan"], ["price_plans.name"], name=op.f("fk_plan_assignments_plan_price_plans")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plan_assignments")),
        sa.UniqueConstraint("tenant_id", "effective_from", name="uq_plan_assignments_tenant_from"),
    )
    op.create_table(
        "price_plan_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("plan", sa.String(length=64), nullable=False),
        sa.Column("effective_from", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("request_price_per_million", sa.String(length=64), nullable=False),
        sa.Column("gb_second_price", sa.String(length=64), nullable=False),
        sa.Column("tiers", sa.JSON(), nullable=False),
        sa.Column("free_requests", sa.BigInteger(), nullable=False),
        sa.Column("free_gb_seconds", sa.String(length=64), nullable=False),
        sa.Column("provisioned_gb_second_price", sa.String(length=64), nullable=False),
        sa.Column("provisioned_duration_gb_second_price", sa.String(length=64), nullable=False),
        sa.Column("bill_init", sa.Boolean(), nullable=False),
        sa.Column("created_at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["plan"],
            ["price_plans.name"],
            name=op.f("fk_price_plan_versions_plan_price_plans"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_price_plan_versions")),
        sa.UniqueConstraint("plan", "effective_from", name="uq_price_plan_versions_plan_from"),
    )
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.create_index("ix_usage_records_recorded_at", ["recorded_at"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_records_recorded_at")

    op.drop_table("price_plan_versions")
    op.drop_table("plan_assignments")
    op.drop_table("invoice_lines")
    op.drop_table("usage_rollup_state")
    with op.batch_alter_table("usage_minutes", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_minutes_bucket_start")

    op.drop_table("usage_minutes")
    op.drop_table("usage_late_hours")
    with op.batch_alter_table("usage_hours", schema=None) as batch_op:
        batch_op.drop_index("ix_usage_hours_bucket_start")

    op.drop_table("usage_hours")
    with op.batch_alter_table("provisioned_concurrency_changes", schema=None) as batch_op:
        batch_op.drop_index("ix_provisioned_concurrency_changes_tenant_at")

    op.drop_table("provisioned_concurrency_changes")
    op.drop_table("price_plans")
    op.drop_table("invoices")
    op.drop_table("budgets")
    op.drop_table("budget_events")
