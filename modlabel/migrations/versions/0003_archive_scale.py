"""Archive scale: vanished files, skipped files, figure ids, running class sums, indexes.

- ``images.missing_since``: when a file was found gone (its row stays until
  ``modlabel prune``); ``images.source_id``: the id of a figure in a user's table.
- ``images.path`` compares byte-wise on PostgreSQL (collation "C"), as on SQLite,
  so that a scan can merge its sorted walk with the stored paths of a folder.
- ``scans.skipped``: files seen but not taken as images; ``scans.missing``: files
  found gone by the scan.
- ``models.class_min_confidence``: the confidence an image needs to count in its
  class's average (Eq. 8); NULL until the running sums are built.
- ``class_maps.map_sum``: the running sum of the counted images' normalized maps
  (float64), so that a scan updates class averages in proportion to what changed.
- Indexes for every lookup of the scan, the report and the named queries.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("missing_since", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("source_id", sa.Text))
    if bind.dialect.name == "postgresql":
        op.alter_column("images", "path", type_=sa.Text(collation="C"))
    op.add_column("scans", sa.Column("skipped", sa.Integer, nullable=False, server_default="0"))
    op.add_column("scans", sa.Column("missing", sa.Integer, nullable=False, server_default="0"))
    op.add_column("models", sa.Column("class_min_confidence", sa.Float))
    with op.batch_alter_table("class_maps") as batch:
        batch.add_column(sa.Column("map_sum", sa.LargeBinary))
    op.drop_index("ix_images_model_label", table_name="images")
    op.create_index(
        "ix_images_model_label_confidence", "images", ["model_id", "label", "confidence"]
    )
    op.create_index("ix_images_model_labeled_at", "images", ["model_id", "labeled_at"])
    op.create_index(
        "ix_images_errors",
        "images",
        ["model_id", "path"],
        postgresql_where=sa.text("error IS NOT NULL"),
        sqlite_where=sa.text("error IS NOT NULL"),
    )
    op.create_index(
        "ix_images_missing",
        "images",
        ["model_id", "missing_since"],
        postgresql_where=sa.text("missing_since IS NOT NULL"),
        sqlite_where=sa.text("missing_since IS NOT NULL"),
    )
    op.create_index("ix_images_model_source_id", "images", ["model_id", "source_id"])


def downgrade() -> None:
    op.drop_index("ix_images_model_source_id", table_name="images")
    op.drop_index("ix_images_missing", table_name="images")
    op.drop_index("ix_images_errors", table_name="images")
    op.drop_index("ix_images_model_labeled_at", table_name="images")
    op.drop_index("ix_images_model_label_confidence", table_name="images")
    op.create_index("ix_images_model_label", "images", ["model_id", "label"])
    with op.batch_alter_table("class_maps") as batch:
        batch.drop_column("map_sum")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("class_min_confidence")
    with op.batch_alter_table("scans") as batch:
        batch.drop_column("missing")
        batch.drop_column("skipped")
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("images", "path", type_=sa.Text())
    with op.batch_alter_table("images") as batch:
        batch.drop_column("source_id")
        batch.drop_column("missing_since")
