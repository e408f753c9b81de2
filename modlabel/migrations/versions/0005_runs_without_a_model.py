"""Runs that end before they know their model are recorded too.

- ``scans.model_id`` may be NULL: a scan stopped by a signal before its model
  was loaded, or one that could not start, still leaves a row saying how it ended.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scans") as batch:
        batch.alter_column("model_id", existing_type=sa.Integer, nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM scans WHERE model_id IS NULL")
    with op.batch_alter_table("scans") as batch:
        batch.alter_column("model_id", existing_type=sa.Integer, nullable=False)
