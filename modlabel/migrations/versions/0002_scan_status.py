"""Honest run records: a scan's status, the reason it failed, its host and pid, its heartbeat.

Scans recorded before this revision finished or crashed without saying so;
they are marked "finished" when they have a finish time and "interrupted"
otherwise.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "scans", sa.Column("status", sa.String(16), nullable=False, server_default="finished")
    )
    op.add_column("scans", sa.Column("reason", sa.Text))
    op.add_column("scans", sa.Column("host", sa.String(255)))
    op.add_column("scans", sa.Column("pid", sa.Integer))
    op.add_column("scans", sa.Column("alive_until", sa.DateTime(timezone=True)))
    op.execute("UPDATE scans SET status = 'interrupted' WHERE finished_at IS NULL")
    op.create_index("ix_scans_model_status", "scans", ["model_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_scans_model_status", table_name="scans")
    with op.batch_alter_table("scans") as batch:
        for column in ("alive_until", "pid", "host", "reason", "status"):
            batch.drop_column(column)
