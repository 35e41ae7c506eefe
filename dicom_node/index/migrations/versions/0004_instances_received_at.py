"""instances.received_at index: the status page counts the instances received lately

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 08:45:00
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_instances_received_at", "instances", ["received_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_instances_received_at", table_name="instances")
