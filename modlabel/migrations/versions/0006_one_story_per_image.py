"""Every output tells the same story about an image.

- ``images.runner_up`` and ``runner_up_probability``: the second class and its
  calibrated probability, beside the label and its confidence;
- ``images.roi_share``: the share of the image where its CRM, as shown, is above
  the display threshold (Table 3's ratio), computed once by the scan;
- ``images.error_kind``: what kind of error an error row holds (``reasons.Kind``),
  beside its sentence in ``error``;
- an index on ``(model_id, dicom_modality)`` for the modality-agreement query.

Rows labeled before have NULL in the new columns until they are labeled again
(the report computes ``roi_share`` of those from their stored map).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("runner_up", sa.String(80)))
        batch.add_column(sa.Column("runner_up_probability", sa.Float))
        batch.add_column(sa.Column("roi_share", sa.Float))
        batch.add_column(sa.Column("error_kind", sa.String(32)))
    op.create_index("ix_images_model_dicom_modality", "images", ["model_id", "dicom_modality"])


def downgrade() -> None:
    op.drop_index("ix_images_model_dicom_modality", table_name="images")
    with op.batch_alter_table("images") as batch:
        for column in ("error_kind", "roi_share", "runner_up_probability", "runner_up"):
            batch.drop_column(column)
