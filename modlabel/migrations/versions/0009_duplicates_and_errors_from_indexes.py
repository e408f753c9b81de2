"""The duplicates and errors queries read an index, not the table.

- ``ix_images_present_hashes`` on ``(model_id, sha256, out_of_set, error,
  missing_since)`` where a present, labeled row has a hash: the duplicates query groups
  the model's hashes on this narrow index (index-only, in hash order: no sort), then
  reads the rows of the few repeated hashes. ``error`` and ``missing_since`` are columns
  too, though always NULL in it: SQLite counts an index as covering only if it holds
  every column the query names (see 0008).
- ``ix_images_errors_by_kind`` on ``(model_id, error_kind, path)`` where ``error`` is set:
  the errors query's rows in its own order. SQLite, without statistics (modlabel never
  runs ANALYZE), sees no reason to prefer the narrow errors index to any other on
  ``model_id``, and then reads every row of the model; an index in the query's order,
  which spares a sort, is one it always takes.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

PRESENT_WITH_A_HASH = "sha256 IS NOT NULL AND error IS NULL AND missing_since IS NULL"


def upgrade() -> None:
    op.create_index(
        "ix_images_present_hashes",
        "images",
        ["model_id", "sha256", "out_of_set", "error", "missing_since"],
        postgresql_where=sa.text(PRESENT_WITH_A_HASH),
        sqlite_where=sa.text(PRESENT_WITH_A_HASH),
    )
    op.create_index(
        "ix_images_errors_by_kind",
        "images",
        ["model_id", "error_kind", "path"],
        postgresql_where=sa.text("error IS NOT NULL"),
        sqlite_where=sa.text("error IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_images_errors_by_kind", table_name="images")
    op.drop_index("ix_images_present_hashes", table_name="images")
