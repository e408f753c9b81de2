"""The duplicates and model-disagreements queries read only indexes, never the table.

Both read every row of a model by nature; read from the table, that is every row with its
CRM (most of a row's bytes): 3.5-3.8 s on a million rows per model on PostgreSQL.

- ``ix_images_model_path_labels`` on ``(model_id, path, label, confidence, out_of_set,
  missing_since)``: model-disagreements reads each model's rows in path order from it
  alone and merges the two (no hash of a million rows, no sort); on SQLite it finds the
  other model's row of each path in it.
- ``ix_images_present_hashes`` gets ``path`` and ``label``: duplicates then groups the
  model's hashes, their paths and labels in one pass over it, instead of grouping the
  hashes and reading the rows of the repeated ones from the table (a tenth of the rows in
  the benchmark's archive). ``error`` and ``missing_since`` stay columns of it, though
  always NULL in it: SQLite counts an index as covering only if it holds every column the
  query names (0008).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

PRESENT_WITH_A_HASH = "sha256 IS NOT NULL AND error IS NULL AND missing_since IS NULL"
HASH_COLUMNS = ["model_id", "sha256", "out_of_set", "error", "missing_since"]


def _present_hashes(columns: list[str]) -> None:
    op.create_index(
        "ix_images_present_hashes",
        "images",
        columns,
        postgresql_where=sa.text(PRESENT_WITH_A_HASH),
        sqlite_where=sa.text(PRESENT_WITH_A_HASH),
    )


def upgrade() -> None:
    op.create_index(
        "ix_images_model_path_labels",
        "images",
        ["model_id", "path", "label", "confidence", "out_of_set", "missing_since"],
    )
    op.drop_index("ix_images_present_hashes", table_name="images")
    _present_hashes([*HASH_COLUMNS, "path", "label"])


def downgrade() -> None:
    op.drop_index("ix_images_present_hashes", table_name="images")
    _present_hashes(HASH_COLUMNS)
    op.drop_index("ix_images_model_path_labels", table_name="images")
