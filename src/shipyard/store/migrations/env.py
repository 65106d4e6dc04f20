"""Alembic's entry point for the store's migrations: runs them on the connection that
``store.engine.upgrade`` hands over in ``config.attributes`` (already in a transaction, holding
the upgrade lock). There is no offline (SQL script) mode."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run the store's migrations with `shipyard db upgrade`")
context.configure(
    connection=connection,
    render_as_batch=connection.dialect.name == "sqlite",
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations()
