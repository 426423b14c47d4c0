"""concurrency settings and worker registry

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 16:22:36.441852
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.db

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=255), nullable=False),
        sa.Column("capacity_mb", sa.Integer(), nullable=False),
        sa.Column("cpus", sa.Integer(), nullable=False),
        sa.Column("sandbox", sa.String(length=32), nullable=False),
        sa.Column("registered_at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_heartbeat_at", app.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    with op.batch_alter_table("functions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reserved_concurrency", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("provisioned_concurrency", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("functions", schema=None) as batch_op:
        batch_op.drop_column("provisioned_concurrency")
        batch_op.drop_column("reserved_concurrency")

    op.drop_table("workers")
