"""Every labeled image keeps its embedding, for similar-image search.

- ``images.embedding``: the image's GAP embedding (the K-vector the dense head sees), as
  ``codec.encode_embeddings`` writes it: the L2-normalized vector as int8 codes with a
  scale, 9 + K bytes. Written with the label, in the same transaction.
- ``settings``: facts about the database itself, one row each. ``similar_search`` records
  how it searches, chosen here once: ``pgvector`` where PostgreSQL has the ``vector``
  extension (installed here when it is available and allowed), else ``exact``
  (``store.similar``).
- With ``pgvector``: ``images.embedding_vec`` (``halfvec``), kept by a trigger as the
  embedding's int8 codes, whose cosine is the embedding's; a model's HNSW index on it is
  built by ``modlabel db index-embeddings`` (``store.similar.create_search_index``).

Rows labeled before have no embedding until they are labeled again, or until
``modlabel db backfill-embeddings`` fills them without touching their labels.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# The embedding's codes start after its 9-byte header (codec: magic, version, K, scale);
# get_byte gives 0..255, the codes are signed.
EMBEDDING_VEC_TRIGGER = """
CREATE OR REPLACE FUNCTION modlabel_embedding_vec() RETURNS trigger AS $$
BEGIN
    IF NEW.embedding IS NULL THEN
        NEW.embedding_vec := NULL;
    ELSE
        NEW.embedding_vec := (
            SELECT array_agg(
                CASE WHEN b > 127 THEN b - 256 ELSE b END::real ORDER BY i
            )::halfvec
            FROM (
                SELECT i, get_byte(NEW.embedding, i) AS b
                FROM generate_series(9, length(NEW.embedding) - 1) AS i
            ) AS codes
        );
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER images_embedding_vec
    BEFORE INSERT OR UPDATE OF embedding ON images
    FOR EACH ROW EXECUTE FUNCTION modlabel_embedding_vec();
"""


# 1 - cos of two stored embeddings, for SQL users (sql/similar.sql; SQLite has the same,
# from modlabel's connections): exact and slow at scale, where `modlabel similar` is fast.
COSINE_FUNCTION = """
CREATE OR REPLACE FUNCTION modlabel_cosine_distance(a bytea, b bytea)
RETURNS double precision LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT 1 - sum(x * y) / nullif(sqrt(sum(x * x)) * sqrt(sum(y * y)), 0)
    FROM (
        SELECT (CASE WHEN get_byte(a, i) > 127 THEN get_byte(a, i) - 256
                     ELSE get_byte(a, i) END)::float8 AS x,
               (CASE WHEN get_byte(b, i) > 127 THEN get_byte(b, i) - 256
                     ELSE get_byte(b, i) END)::float8 AS y
        FROM generate_series(9, length(a) - 1) AS i
        WHERE length(a) = length(b)
    ) AS codes
$$;
"""


def _pgvector(bind: sa.Connection) -> bool:
    """Whether the ``vector`` extension is there, or can be installed here (0.7+: halfvec)."""
    available = bind.execute(
        sa.text("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'")
    ).scalar()
    if available is None:
        return False
    major, minor = (int(part) for part in str(available).split(".")[:2])
    if (major, minor) < (0, 7):
        return False
    savepoint = bind.begin_nested()
    try:
        bind.execute(sa.text("CREATE EXTENSION IF NOT EXISTS vector"))
    except sa.exc.DBAPIError:  # not allowed for this role: search exactly instead
        savepoint.rollback()
        return False
    savepoint.commit()
    return True


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("embedding", sa.LargeBinary))
    settings = op.create_table(
        "settings",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    method = "exact"
    if bind.dialect.name == "postgresql":
        op.execute(COSINE_FUNCTION)
    if bind.dialect.name == "postgresql" and _pgvector(bind):
        method = "pgvector"
        op.execute("ALTER TABLE images ADD COLUMN embedding_vec halfvec")
        op.execute(EMBEDDING_VEC_TRIGGER)
    op.bulk_insert(settings, [{"key": "similar_search", "value": method}])


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS images_embedding_vec ON images")
        op.execute("DROP FUNCTION IF EXISTS modlabel_embedding_vec()")
        op.execute("DROP FUNCTION IF EXISTS modlabel_cosine_distance(bytea, bytea)")
        op.execute("DROP INDEX IF EXISTS ix_images_embedding_vec")
        op.execute("ALTER TABLE images DROP COLUMN IF EXISTS embedding_vec")
    op.drop_table("settings")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("embedding")
