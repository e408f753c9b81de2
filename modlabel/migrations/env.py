"""Alembic environment: modlabel passes its own connection in ``config.attributes``."""

from alembic import context

from modlabel.store import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - modlabel always passes one
    raise RuntimeError("run migrations through modlabel.store.upgrade_schema")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
