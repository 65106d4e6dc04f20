"""The one way to open the store's database: ``open_engine``, and its schema's migrations.

Called by the composition root (``api/context.py``), by every CLI command that reads the store
(``cli/token.py``, ``cli/audit.py``, ``cli/regions.py``, ``cli/db.py``...) and by the tests.

``database`` None is SQLite in the data directory (``<data_dir>/shipyard.db``, WAL mode), as
before issue 14; a ``postgresql://`` URL (``--database`` / ``SHIPYARD_DATABASE``) is the store
several control-plane replicas share, spoken to through psycopg 3 (``postgresql+psycopg://``).
A URL's password is never shown: ``shown_url`` masks it in every message and log line.

The schema is Alembic's (``store/migrations``): ``upgrade`` brings a database to the newest
revision and is run by ``open_engine`` unless the caller only reads. A database written before
the migrations existed (tables, no ``alembic_version``) is adopted by ``0001_baseline``, which
creates only what is missing. Concurrent upgrades are serialised: PostgreSQL's
``pg_advisory_xact_lock`` in the upgrading transaction, a lock file beside a SQLite database.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from shipyard.errors import InvalidInput, TransientError

_logger = logging.getLogger("shipyard.store")

MIGRATIONS = Path(__file__).parent / "migrations"
#: The key of the PostgreSQL advisory lock held while a replica upgrades the schema
#: (``hash('shipyard.store.migrations')`` folded into a bigint; any constant would do).
_ADVISORY_KEY = 0x5348_4950_5941_5244 & 0x7FFF_FFFF_FFFF_FFFF
DEFAULT_FILENAME = "shipyard.db"


def database_url(database: str | None, data_dir: Path) -> URL:
    """The SQLAlchemy URL for ``--database``: None is ``<data_dir>/shipyard.db``;
    ``postgresql://`` / ``postgres://`` become ``postgresql+psycopg://``; ``sqlite:///PATH``
    is taken as is. InvalidInput for anything else, saying what is accepted."""
    if database is None or not database.strip():
        return make_url(f"sqlite:///{data_dir / DEFAULT_FILENAME}")
    try:
        url = make_url(database.strip())
    except ArgumentError:
        raise InvalidInput(
            "--database must be a URL such as postgresql://USER:PASSWORD@HOST:5432/NAME (what "
            "was given is not shown: it may hold a password)"
        ) from None
    if url.drivername in {"postgresql", "postgres", "postgresql+psycopg"}:
        return url.set(drivername="postgresql+psycopg")
    if url.drivername == "sqlite":
        if not url.database or url.database == ":memory:":
            raise InvalidInput("--database sqlite:///PATH needs a file (a memory store is lost)")
        return url
    raise InvalidInput(
        f"--database {shown_url(url)}: Shipyard stores on PostgreSQL (postgresql://...) or "
        "SQLite (sqlite:///PATH, or no --database for <data-dir>/shipyard.db)"
    )


def shown_url(url: URL | str) -> str:
    """``url`` with its password masked, for messages and logs."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a URL; not shown, it may hold a password)"


def open_engine(database: str | None, data_dir: Path, *, migrate: bool = True) -> Engine:
    """An engine on the store (see the module docstring), upgraded to the newest schema unless
    ``migrate`` is False (read-only callers: ``shipyard db current``, ``audit verify``).

    SQLite: the data directory is created, WAL mode, ``busy_timeout`` 5 s. PostgreSQL: a pool
    that checks a connection before lending it (a failed-over server's dead sockets are not
    handed to a request). InvalidInput for a bad URL; TransientError if the database does not
    answer."""
    url = database_url(database, data_dir)
    if url.get_backend_name() == "sqlite":
        engine = _sqlite_engine(url, data_dir if database is None else None)
    else:
        engine = create_engine(
            url,
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=20,
            pool_timeout=10,
            pool_recycle=1800,
            connect_args={"connect_timeout": 10, "application_name": "shipyard"},
        )
    if migrate:
        try:
            upgrade(engine)
        except BaseException:
            engine.dispose()
            raise
    return engine


def _sqlite_engine(url: URL, data_dir: Path | None) -> Engine:
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")  # durable across process kills (WAL)
        cur.execute("PRAGMA busy_timeout=5000")
        cur.close()

    return engine


def open_read_only(database: str | None, data_dir: Path) -> Engine:
    """An engine that cannot write: SQLite opened ``mode=ro`` (NotFound-style InvalidInput if
    the file is missing, so a typo does not make an empty store), PostgreSQL with read-only
    transactions. For ``shipyard audit verify|show|prove``: reading must not change the
    evidence, not even by migrating it."""
    url = database_url(database, data_dir)
    if url.get_backend_name() == "sqlite":
        path = Path(str(url.database))
        if not path.is_file():
            raise InvalidInput(f"no Shipyard database at {path}")
        uri = f"{path.resolve().as_uri().replace('file://', 'file:', 1)}?mode=ro"
        return create_engine(
            "sqlite://", creator=lambda: sqlite3.connect(uri, uri=True), poolclass=NullPool
        )
    return create_engine(
        url,
        poolclass=NullPool,
        connect_args={
            "connect_timeout": 10,
            "application_name": "shipyard-read-only",
            "options": "-c default_transaction_read_only=on",
        },
    )


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for the packaged migrations (no ``alembic.ini``): ``connection``
    is the one ``env.py`` runs them on."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration's id."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None  # the package ships its migrations
    return head


def known_revisions() -> list[str]:
    """Every migration's id this release ships, oldest first."""
    script = ScriptDirectory.from_config(alembic_config())
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def current_revision(engine: Engine) -> str | None:
    """The revision ``engine``'s database is at (None: never migrated, or empty)."""
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise _unavailable(engine, exc) from exc


def upgrade(engine: Engine) -> str:
    """Bring the database to the newest revision (nothing to do is one read); returns it.
    Replicas starting together take turns (see the module docstring)."""
    head = head_revision()
    at = current_revision(engine)
    if at == head:
        return head
    if at is not None and at not in known_revisions():
        # A replica of a newer release migrated the store: this one cannot use its schema.
        raise InvalidInput(
            f"the store {shown_url(engine.url)} is at schema revision {at}, which this release "
            f"of Shipyard does not know (its newest is {head}): run the newer release"
        )
    try:
        with _upgrade_lock(engine), engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_KEY})
            before = MigrationContext.configure(conn).get_current_revision()
            if before != head:
                _logger.info(
                    "upgrading the store %s from %s to %s",
                    shown_url(engine.url),
                    before or "(no revision)",
                    head,
                )
                command.upgrade(alembic_config(conn), "head")
    except SQLAlchemyError as exc:
        raise _unavailable(engine, exc) from exc
    return head


@contextlib.contextmanager
def _upgrade_lock(engine: Engine) -> Iterator[None]:
    """SQLite: a lock file beside the database (``BEGIN IMMEDIATE`` cannot span Alembic's
    DDL, which pysqlite commits as it goes). PostgreSQL: nothing here, the advisory lock does."""
    if engine.dialect.name != "sqlite" or not engine.url.database:
        yield
        return
    path = Path(engine.url.database)
    fd = os.open(path.with_name(path.name + ".migrate.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _unavailable(engine: Engine, exc: SQLAlchemyError) -> TransientError:
    cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return TransientError(
        f"cannot use the store {shown_url(engine.url)}: {(cause[0] if cause else '')[:200]}",
        retry_after=5.0,
    )
