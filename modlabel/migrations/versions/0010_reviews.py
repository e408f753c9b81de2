"""Human labels, kept apart from the model's: the ``reviews`` table.

A review is what a person said an image is: a class name, or NULL for "none of the
classes". It is keyed by the image itself, not by a row of ``images``: those rows are
one per (model, path), a relabel with a new model adds rows, and ``prune`` deletes them.
A review names the stored path (``paths.to_db`` text) and the file's content hash
(``images.sha256``), so it holds for every model's row of that file, survives relabels,
rescans and prunes, and stops applying the day the file's content changes.

- ``reviews``: ``label`` (NULL: none of the classes), ``reviewer``, ``reviewed_at``
  (UTC), ``note``, ``strategy`` (the review queue that chose the image: uncertainty,
  out-of-set, disagreement, diverse, random; or manual, csv), ``model_id`` (the model
  whose labels the reviewer saw, for the record; NULL when unknown), and ``undone_at`` /
  ``undone_by`` (set when the review was taken back). Rows are never updated but to
  undo them, and never deleted: the table is the log of what people said.
- The latest review of an image that was not undone is its review.
  ``ix_reviews_current`` on ``(path, sha256, id)`` where ``undone_at IS NULL`` finds it
  (and tells that no later one exists) with index probes: the reads LEFT JOIN it.
- ``ix_reviews_reviewed_at``: the latest reviews first (``modlabel review`` lists them).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# Paths compare byte-wise, as images.path does (schema.PATH_TYPE).
PATH_TYPE = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("path", PATH_TYPE, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("label", sa.String(80)),
        sa.Column("reviewer", sa.String(255), nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("strategy", sa.String(32), nullable=False),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id")),
        sa.Column("undone_at", sa.DateTime(timezone=True)),
        sa.Column("undone_by", sa.String(255)),
    )
    op.create_index(
        "ix_reviews_current",
        "reviews",
        ["path", "sha256", "id"],
        postgresql_where=sa.text("undone_at IS NULL"),
        sqlite_where=sa.text("undone_at IS NULL"),
    )
    op.create_index("ix_reviews_reviewed_at", "reviews", ["reviewed_at"])


def downgrade() -> None:
    op.drop_index("ix_reviews_reviewed_at", table_name="reviews")
    op.drop_index("ix_reviews_current", table_name="reviews")
    op.drop_table("reviews")
