"""Indexes that let the report and the named queries read an index, not the table.

- ``ix_images_present_labels`` on ``(model_id, label, out_of_set, confidence,
  missing_since)`` where ``missing_since IS NULL``: the class counts, the mean
  confidences and the confidence histograms of the files that are there read this
  narrow index (index-only on both databases) instead of every row with its CRM.
  ``missing_since`` is a column too, though always NULL in it: SQLite counts an index
  as covering only if it holds every column the query names, its WHERE's included.
- ``ix_images_model_dicom_modality_upper`` on ``(model_id, upper(dicom_modality))``:
  the modality-agreement query joins its mapping on ``UPPER(dicom_modality)`` (a header
  may spell a code in lower case), so only an index on that expression finds the DICOM
  rows of a code; the plain ``(model_id, dicom_modality)`` index cannot.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_images_present_labels",
        "images",
        ["model_id", "label", "out_of_set", "confidence", "missing_since"],
        postgresql_where=sa.text("missing_since IS NULL"),
        sqlite_where=sa.text("missing_since IS NULL"),
    )
    op.create_index(
        "ix_images_model_dicom_modality_upper",
        "images",
        ["model_id", sa.text("upper(dicom_modality)")],
    )


def downgrade() -> None:
    op.drop_index("ix_images_model_dicom_modality_upper", table_name="images")
    op.drop_index("ix_images_present_labels", table_name="images")
