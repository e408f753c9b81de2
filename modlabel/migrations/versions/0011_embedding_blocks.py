"""The exact similar-image search reads embeddings in blocks, not row by row.

A search without pgvector compares the query with every stored embedding of the model.
Read as rows of ``images`` that costs about 4 µs a row at a million rows (each row is
~1.2 KB wide with its CRM and probabilities, and each becomes Python objects), far
from the 2 s a search should take. ``embedding_blocks`` holds the same embeddings as
arrays, one row per (model, block of ``BLOCK_ROWS`` row ids: ``block = id / 1024``):

- ``row_count``: how many of the block's rows are searchable (the model's rows with an
  embedding, no error, not missing); NULL: the block is stale and the search reads its
  rows from ``images`` instead;
- ``dims`` (K), ``ids`` (int64), ``codes`` (the embeddings' int8 codes, row_count x K),
  ``norms`` (float32, the codes' L2 norms), ``labels`` (the block's distinct labels,
  JSON), ``label_codes`` (uint16 index into ``labels`` a row, 65535 for none),
  ``out_of_set`` (uint8 a row), all little-endian.

Triggers on ``images`` mark a block stale (its data set to NULL) whenever a row of it is
inserted or deleted, or its embedding, label, out-of-set flag, missing_since, error or
model changes, in the same statement: a block that is not stale is always exact. The
writers (``store.images``) rebuild stale blocks in their own transactions
(``store.similar.refresh_embedding_blocks``). Here every block that holds rows is
recorded stale; the next writes build them.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# store.similar.BLOCK_ROWS: row ids per block.
BLOCK_ROWS = 1024
# What a block depends on: a change of any of these makes it stale.
WATCHED = ("model_id", "embedding", "label", "out_of_set", "missing_since", "error")
DATA = ("row_count", "dims", "ids", "codes", "norms", "labels", "label_codes", "out_of_set")


def _mark_stale(row: str) -> str:
    """The statement that records the block of ``row`` (NEW or OLD) as stale."""
    cleared = ", ".join(f"{name} = NULL" for name in DATA)
    return (
        f"INSERT INTO embedding_blocks (model_id, block) "
        f"VALUES ({row}.model_id, {row}.id / {BLOCK_ROWS}) "
        f"ON CONFLICT (model_id, block) DO UPDATE SET {cleared} "
        f"WHERE embedding_blocks.row_count IS NOT NULL;"
    )


def _changed(distinct: str) -> str:
    return " OR ".join(f"OLD.{name} {distinct} NEW.{name}" for name in WATCHED)


SQLITE_TRIGGERS = [
    f"CREATE TRIGGER images_embedding_blocks_insert AFTER INSERT ON images "
    f"BEGIN {_mark_stale('NEW')} END",
    f"CREATE TRIGGER images_embedding_blocks_delete AFTER DELETE ON images "
    f"BEGIN {_mark_stale('OLD')} END",
    f"CREATE TRIGGER images_embedding_blocks_update AFTER UPDATE OF {', '.join(WATCHED)} "
    f"ON images WHEN {_changed('IS NOT')} "
    f"BEGIN {_mark_stale('OLD')} {_mark_stale('NEW')} END",
]

POSTGRES_TRIGGERS = [
    f"""
CREATE OR REPLACE FUNCTION modlabel_embedding_block_stale() RETURNS trigger AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        {_mark_stale("OLD")}
    END IF;
    IF TG_OP <> 'DELETE' THEN
        {_mark_stale("NEW")}
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql
""",
    "CREATE TRIGGER images_embedding_blocks AFTER INSERT OR DELETE ON images "
    "FOR EACH ROW EXECUTE FUNCTION modlabel_embedding_block_stale()",
    f"CREATE TRIGGER images_embedding_blocks_update AFTER UPDATE OF {', '.join(WATCHED)} "
    f"ON images FOR EACH ROW WHEN ({_changed('IS DISTINCT FROM')}) "
    "EXECUTE FUNCTION modlabel_embedding_block_stale()",
]


def upgrade() -> None:
    op.create_table(
        "embedding_blocks",
        sa.Column(
            "model_id",
            sa.Integer,
            sa.ForeignKey("models.id", ondelete="CASCADE"),
            primary_key=True,
            autoincrement=False,
        ),
        sa.Column("block", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("row_count", sa.Integer),
        sa.Column("dims", sa.Integer),
        sa.Column("ids", sa.LargeBinary),
        sa.Column("codes", sa.LargeBinary),
        sa.Column("norms", sa.LargeBinary),
        sa.Column("labels", sa.JSON),
        sa.Column("label_codes", sa.LargeBinary),
        sa.Column("out_of_set", sa.LargeBinary),
    )
    dialect = op.get_bind().dialect.name
    for statement in SQLITE_TRIGGERS if dialect == "sqlite" else POSTGRES_TRIGGERS:
        op.execute(statement)
    op.execute(
        f"INSERT INTO embedding_blocks (model_id, block) "
        f"SELECT DISTINCT model_id, id / {BLOCK_ROWS} FROM images"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS images_embedding_blocks_{name}")
    else:
        op.execute("DROP TRIGGER IF EXISTS images_embedding_blocks_update ON images")
        op.execute("DROP TRIGGER IF EXISTS images_embedding_blocks ON images")
        op.execute("DROP FUNCTION IF EXISTS modlabel_embedding_block_stale()")
    op.drop_table("embedding_blocks")
