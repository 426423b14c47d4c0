"""worker liveness shared by every API process

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-04 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("boot_id", sa.String(length=64), server_default="", nullable=False)
        )
        batch_op.add_column(
            sa.Column("status", sa.String(length=16), server_default="active", nullable=False)
        )
        batch_op.add_column(
            sa.Column("reserved_mb", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("reserved_seq", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("idle_mb", sa.Integer(), server_default="0", nullable=False))
        for state in ("initializing", "idle", "busy"):
            batch_op.add_column(
                sa.Column(f"instances_{state}", sa.Integer(), server_default="0", nullable=False)
            )
        batch_op.add_column(
            sa.Column("draining", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        for column in (
            "draining",
            "instances_busy",
            "instances_idle",
            "instances_initializing",
            "idle_mb",
            "reserved_seq",
            "reserved_mb",
            "status",
            "boot_id",
        ):
            batch_op.drop_column(column)
