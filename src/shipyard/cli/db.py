"""``shipyard db``: the store's schema from a terminal (registered by ``cli.main``).

    shipyard db upgrade [--database URL] [--data-dir DIR]   migrate to the newest revision
    shipyard db current [--database URL] [--data-dir DIR]   the revision it is at, and the newest

``shipyard serve`` upgrades at start too (``store.engine.open_engine``); ``upgrade`` is for an
operator who migrates before rolling replicas onto a new release. Exit 2 for a bad URL or a
store that does not answer; ``current`` exits 1 when the store is behind the newest revision.
"""

from __future__ import annotations

from pathlib import Path

import typer

from shipyard.cli.common import Database, DataDir, fail, open_store
from shipyard.errors import InvalidInput, TransientError
from shipyard.store.engine import (
    current_revision,
    head_revision,
    known_revisions,
    open_engine,
    shown_url,
)

db_app = typer.Typer(
    name="db", help="The store's schema (Alembic migrations).", no_args_is_help=True
)


@db_app.callback()
def _group() -> None:
    """The store's schema (Alembic migrations)."""


@db_app.command()
def upgrade(database: Database = None, data_dir: DataDir = Path(".shipyard")) -> None:
    """Migrate the store to the newest schema revision (waits for another replica's upgrade)."""
    engine = open_store(database, data_dir)
    try:
        typer.echo(f"{shown_url(engine.url)} is at {current_revision(engine)} (newest)")
    finally:
        engine.dispose()


@db_app.command()
def current(database: Database = None, data_dir: DataDir = Path(".shipyard")) -> None:
    """Print the store's schema revision and the newest one; exit 1 if it is behind."""
    if database is None and not (data_dir / "shipyard.db").is_file():
        raise fail(f"no Shipyard database at {data_dir / 'shipyard.db'}")
    try:
        engine = open_engine(database, data_dir, migrate=False)
        try:
            at = current_revision(engine)
        finally:
            engine.dispose()
    except (InvalidInput, TransientError) as exc:
        raise fail(exc.message) from exc
    head = head_revision()
    typer.echo(f"{shown_url(engine.url)}: {at or '(no revision)'}; newest: {head}")
    if at is not None and at not in known_revisions():
        typer.echo("newer than this release of Shipyard: run the newer release", err=True)
        raise typer.Exit(1)
    if at != head:
        typer.echo("behind: run `shipyard db upgrade` (or start `shipyard serve`)", err=True)
        raise typer.Exit(1)
