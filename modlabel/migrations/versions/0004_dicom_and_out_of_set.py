"""Real archives: DICOM header columns, out-of-set images, calibrated models.

- ``images.dicom_modality``, ``dicom_body_part``, ``dicom_sop_uid``: the DICOM
  header's Modality, BodyPartExamined and SOPInstanceUID, beside the predicted label.
- ``images.ood_score`` and ``images.out_of_set``: the out-of-set score of an image
  and whether it passed the model's threshold (flagged images keep their label and
  probabilities; default queries and class averages leave them out).
- ``models.temperature``: the temperature the scan divided the logits by (1: none).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("dicom_modality", sa.String(16)))
        batch.add_column(sa.Column("dicom_body_part", sa.String(64)))
        batch.add_column(sa.Column("dicom_sop_uid", sa.String(64)))
        batch.add_column(sa.Column("ood_score", sa.Float))
        batch.add_column(sa.Column("out_of_set", sa.Boolean))
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("temperature", sa.Float))
    op.create_index(
        "ix_images_out_of_set",
        "images",
        ["model_id", "path"],
        postgresql_where=sa.text("out_of_set"),
        sqlite_where=sa.text("out_of_set"),
    )


def downgrade() -> None:
    op.drop_index("ix_images_out_of_set", table_name="images")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("temperature")
    with op.batch_alter_table("images") as batch:
        for column in (
            "out_of_set",
            "ood_score",
            "dicom_sop_uid",
            "dicom_body_part",
            "dicom_modality",
        ):
            batch.drop_column(column)
