"""The first schema: models, images, class_maps and scans.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("identity", sa.String(80), nullable=False, unique=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("backbone", sa.String(40), nullable=False),
        sa.Column("class_names", sa.JSON, nullable=False),
        sa.Column("input_size", sa.JSON, nullable=False),
        sa.Column("activation_shape", sa.JSON, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("mtime", sa.Float, nullable=False),
        sa.Column("sha256", sa.String(64)),
        sa.Column("width", sa.Integer),
        sa.Column("height", sa.Integer),
        sa.Column("label", sa.String(80)),
        sa.Column("confidence", sa.Float),
        sa.Column("probabilities", sa.JSON),
        sa.Column("crm", sa.LargeBinary),
        sa.Column("error", sa.Text),
        sa.Column("labeled_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("model_id", "path", name="uq_images_model_path"),
    )
    op.create_index("ix_images_model_label", "images", ["model_id", "label"])
    op.create_index("ix_images_sha256", "images", ["sha256"])
    op.create_table(
        "class_maps",
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), primary_key=True),
        sa.Column("class_name", sa.String(80), primary_key=True),
        sa.Column("image_count", sa.Integer, nullable=False),
        sa.Column("crm", sa.LargeBinary, nullable=False),
        sa.Column("roi_box", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "scans",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False),
        sa.Column("roots", sa.JSON, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("seen", sa.Integer, nullable=False),
        sa.Column("labeled", sa.Integer, nullable=False),
        sa.Column("unchanged", sa.Integer, nullable=False),
        sa.Column("errors", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("scans")
    op.drop_table("class_maps")
    op.drop_index("ix_images_sha256", table_name="images")
    op.drop_index("ix_images_model_label", table_name="images")
    op.drop_table("images")
    op.drop_table("models")
