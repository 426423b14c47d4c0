"""API processes and their concurrency leases

Revision ID: 0007
Revises: 0005
Create Date: 2026-12-05 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.db

revision: str = "0007"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_processes",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("started_at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("shared", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("provisioned", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_processes")),
    )
    op.create_table(
        "concurrency_leases",
        sa.Column("process_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("function_id", sa.String(length=32), nullable=False),
        sa.Column("reserved", sa.Boolean(), nullable=False),
        sa.Column("created_at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["process_id"],
            ["api_processes.id"],
            name=op.f("fk_concurrency_leases_process_id_api_processes"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("process_id", "seq", name=op.f("pk_concurrency_leases")),
    )
    op.create_index(
        "ix_concurrency_leases_tenant_id", "concurrency_leases", ["tenant_id"], unique=False
    )
    op.create_index(
        "ix_concurrency_leases_function_id", "concurrency_leases", ["function_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_concurrency_leases_function_id", table_name="concurrency_leases")
    op.drop_index("ix_concurrency_leases_tenant_id", table_name="concurrency_leases")
    op.drop_table("concurrency_leases")
    op.drop_table("api_processes")
