"""series.frame_of_reference_uid, acquired_from, acquired_to, kernel, extent_from, extent_to:
which scan a series
reconstructs, so that completion analyses one reconstruction of each scan
(`dicom_node.completion.reconstructions`)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 18:00:00

Series indexed before this revision keep NULL: they are never taken for a reconstruction of
another series' scan.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("frame_of_reference_uid", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("acquired_from", sa.Float(), nullable=True))
        batch.add_column(sa.Column("acquired_to", sa.Float(), nullable=True))
        batch.add_column(sa.Column("kernel", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("extent_from", sa.Float(), nullable=True))
        batch.add_column(sa.Column("extent_to", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.drop_column("extent_to")
        batch.drop_column("extent_from")
        batch.drop_column("kernel")
        batch.drop_column("acquired_to")
        batch.drop_column("acquired_from")
        batch.drop_column("frame_of_reference_uid")
