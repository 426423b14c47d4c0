"""container image functions

Revision ID: 0005
Revises: 0006
Create Date: 2026-12-03 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("functions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("package_type", sa.String(length=8), server_default="Zip", nullable=False)
        )
        batch_op.add_column(sa.Column("image_uri", sa.String(length=255), nullable=True))
        batch_op.alter_column("runtime", existing_type=sa.String(length=32), nullable=True)


def downgrade() -> None:
    # Image functions have no runtime, so they cannot be kept in the old schema.
    op.execute("DELETE FROM functions WHERE package_type = 'Image'")
    with op.batch_alter_table("functions", schema=None) as batch_op:
        batch_op.alter_column("runtime", existing_type=sa.String(length=32), nullable=False)
        batch_op.drop_column("image_uri")
        batch_op.drop_column("package_type")
