"""studies.accession_number, patient_name, patient_id (the status page's labels) and an index on
studies.last_received_at (the page's order: one page of studies read from the index, not all
of them sorted)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 10:30:00

Studies indexed before this revision keep NULL until an instance of theirs is received again.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("accession_number", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("patient_name", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("patient_id", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_studies_last_received_at"), ["last_received_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_last_received_at"))
        batch_op.drop_column("patient_id")
        batch_op.drop_column("patient_name")
        batch_op.drop_column("accession_number")
