"""jobs.followup: what became of a job's comparison with the patient's prior study (issue 17)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 10:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("followup", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("followup")
