"""The audit log: the ``AuditLog`` protocol and its SQLite backend, ``SqlAuditLog``.

The orchestrator appends one record per deployment action; ``shipyard audit verify`` / ``show``
(cli/audit.py) read the database read-only through ``verify_database`` / ``read_records``.

``SqlAuditLog`` keeps its own ``audit_log`` table in the deployment store's database (it creates
it, and re-arms triggers that abort UPDATE and DELETE on it, every time it starts), and beside it
``audit_checkpoints``, the checkpoints the publisher (publishing.py) got a witness to accept.
Appends are serialised three ways: an ``asyncio.Lock`` in the process, ``BEGIN IMMEDIATE`` in the
database (two processes cannot both read the same head and fork the chain), and a lock file beside
the anchor so the anchor (``<data_dir>/audit.head``, the newest seq and hash) never moves
backwards. The anchor is written after the commit (temp file, fsync, ``os.replace``, fsync of the
directory); a crash in between leaves it one record behind, which verification accepts and the
next append repairs.

If an append finds the database *behind* its anchor (someone deleted the newest records or
rewrote the head) it chains the new record onto the anchor instead, so the gap stays visible to
``verify`` forever rather than being papered over by the next record.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import logging
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    insert,
    inspect,
    select,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from shipyard.audit.chain import (
    GENESIS_HASH,
    Anchor,
    AuditEvent,
    AuditRecord,
    StoredRow,
    VerifyReport,
    check_event,
    emit_log,
    format_anchor,
    make_row,
    parse_anchor,
    to_record,
    verify_rows,
)
from shipyard.audit.fake import MemoryAuditLog
from shipyard.domain.clock import to_thread
from shipyard.errors import InvalidInput, NotFound

# The brief's names all importable from here too (chain and fake hold the shared parts).
__all__ = [
    "ANCHOR_FILENAME",
    "AuditEvent",
    "AuditLog",
    "AuditRecord",
    "MemoryAuditLog",
    "Publication",
    "SqlAuditLog",
    "VerifyReport",
    "read_anchor",
    "read_records",
    "verify_database",
    "write_anchor",
]

_logger = logging.getLogger("shipyard.audit")

ANCHOR_FILENAME = "audit.head"

metadata = MetaData()

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("timestamp", String(40), nullable=False),
    Column("event_type", String(128), nullable=False),
    Column("deployment_id", String(128)),
    Column("service", String(128)),
    Column("region", String(128)),
    Column("user", String(256)),
    Column("status", String(64)),
    Column("duration_ms", BigInteger),
    Column("detail", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_log_deployment", "deployment_id", "seq"),
)

#: Every checkpoint a witness accepted (publishing.py writes a row per witness and tree size; the
#: same head published again adds none). Only a report of what left the data directory: the
#: proof is the witness's copy, which ``shipyard audit verify --checkpoint`` checks.
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("published_at", String(40), nullable=False),
    Column("witness", String(1024), nullable=False),
    Column("tree_size", BigInteger, nullable=False),
    Column("root_hash", String(64), nullable=False),
    Column("checkpoint", Text, nullable=False),
    Index("ix_audit_checkpoints_size", "tree_size"),
)

# Defence in depth: the chain still catches whoever drops these first.
_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints "
    "BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints "
    "BEGIN SELECT RAISE(ABORT, 'audit_checkpoints is append-only'); END",
)


@dataclass(frozen=True)
class Publication:
    """One checkpoint a witness accepted: when, where, which tree head, and its signed text."""

    published_at: str
    witness: str
    tree_size: int
    root_hash: str
    checkpoint: str


class AuditLog(Protocol):
    """Append-only, hash-chained record of every deployment action."""

    async def append(self, event: AuditEvent) -> AuditRecord:
        """Store ``event`` as the next record (seq 1, 2, 3, ...) and return it."""
        ...

    async def records(
        self, *, deployment_id: str | None = None, limit: int | None = None
    ) -> list[AuditRecord]:
        """Records in seq order; ``limit`` keeps the newest ``limit`` of them."""
        ...


class SqlAuditLog:
    """``AuditLog`` in SQLite (the deployment store's database), anchored by ``anchor_path``."""

    def __init__(
        self, engine: Engine, anchor_path: Path | None, clock: Callable[[], float] = time.time
    ) -> None:
        if engine.dialect.name != "sqlite":
            raise InvalidInput(
                f"SqlAuditLog supports SQLite only (its triggers and BEGIN IMMEDIATE are "
                f"SQLite's), not {engine.dialect.name}"
            )
        if anchor_path is not None and not anchor_path.parent.is_dir():
            raise InvalidInput(f"audit anchor directory {anchor_path.parent} does not exist")
        self._engine = engine
        self._anchor_path = anchor_path
        self._clock = clock
        self._lock = asyncio.Lock()
        metadata.create_all(engine)
        with engine.begin() as conn:
            for ddl in _TRIGGERS:
                conn.exec_driver_sql(ddl)

    async def append(self, event: AuditEvent) -> AuditRecord:
        check_event(event)  # fail before taking any lock
        async with self._lock:
            record = await to_thread(self._append_blocking, event)
        emit_log(record)
        return record

    async def records(
        self, *, deployment_id: str | None = None, limit: int | None = None
    ) -> list[AuditRecord]:
        _check_limit(limit)
        rows = await to_thread(_load_rows, self._engine, deployment_id, limit)
        return [to_record(row) for row in rows]

    @property
    def engine(self) -> Engine:
        """The database it writes (the checkpoint publisher reads the records from it too)."""
        return self._engine

    def verify(self) -> VerifyReport:
        """Walk the whole chain and check its head against the anchor."""
        # Anchor first: it is written after each commit, so rows read later are never behind it.
        anchor, problem = read_anchor(self._anchor_path)
        return verify_rows(_load_rows(self._engine), anchor=anchor, anchor_state=problem)

    def _append_blocking(self, event: AuditEvent) -> AuditRecord:
        with _file_lock(self._anchor_path):
            anchor, problem = read_anchor(self._anchor_path)
            with self._engine.connect() as conn:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                head = conn.execute(
                    select(audit_log.c.seq, audit_log.c.hash)
                    .order_by(audit_log.c.seq.desc())
                    .limit(1)
                ).first()
                prev = Anchor(seq=head[0], hash=head[1]) if head else Anchor(0, GENESIS_HASH)
                if anchor is not None and anchor.seq >= prev.seq and anchor != prev:
                    _logger.error(
                        "audit database head (seq %d) is behind or differs from its anchor "
                        "(seq %d): chaining onto the anchor so the gap stays visible; run "
                        "`shipyard audit verify`",
                        prev.seq,
                        anchor.seq,
                    )
                    prev = anchor
                elif problem is not None and prev.seq > 0:
                    _logger.error(
                        "audit anchor %s %s while the database holds %d records: deletion of "
                        "the newest records before now cannot be ruled out",
                        self._anchor_path,
                        problem,
                        prev.seq,
                    )
                timestamp = dt.datetime.fromtimestamp(self._clock(), dt.UTC)
                row = make_row(prev.seq + 1, timestamp, event, prev.hash)
                conn.execute(insert(audit_log).values(**asdict(row)))
                conn.commit()
            if self._anchor_path is not None:
                try:
                    write_anchor(self._anchor_path, Anchor(seq=row.seq, hash=row.hash))
                except OSError as exc:
                    # The record is committed; an anchor left behind is still consistent (verify
                    # accepts a lagging anchor), only the newest records lose tail protection.
                    _logger.error(
                        "audit record %d committed but the anchor %s could not be written: %s",
                        row.seq,
                        self._anchor_path,
                        exc,
                    )
        return to_record(row)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InvalidInput(f"limit must be a non-negative integer, not {limit!r}")


def _load_rows(
    engine: Engine, deployment_id: str | None = None, limit: int | None = None
) -> list[StoredRow]:
    query = select(audit_log)
    if deployment_id is not None:
        query = query.where(audit_log.c.deployment_id == deployment_id)
    if limit is not None:
        query = query.order_by(audit_log.c.seq.desc()).limit(limit)
    else:
        query = query.order_by(audit_log.c.seq)
    with engine.connect() as conn:
        if not inspect(conn).has_table(audit_log.name):  # dropped, or never created (read-only)
            return []
        rows = [StoredRow(**row._mapping) for row in conn.execute(query)]
    return sorted(rows, key=lambda r: r.seq) if limit is not None else rows


def load_rows_after(engine: Engine, seq: int, limit: int) -> list[StoredRow]:
    """Up to ``limit`` stored rows with a seq above ``seq``, ascending (the publisher's catch-up
    reads the trail in batches so memory stays flat however long it is)."""
    query = select(audit_log).where(audit_log.c.seq > seq).order_by(audit_log.c.seq).limit(limit)
    with engine.connect() as conn:
        if not inspect(conn).has_table(audit_log.name):
            return []
        return [StoredRow(**row._mapping) for row in conn.execute(query)]


def record_publication(engine: Engine, publication: Publication) -> bool:
    """Store ``publication`` unless this witness already has this tree size recorded: True if
    stored. Called by the publisher after a witness accepted a checkpoint."""
    with engine.begin() as conn:
        seen = conn.execute(
            select(audit_checkpoints.c.id)
            .where(audit_checkpoints.c.witness == publication.witness)
            .where(audit_checkpoints.c.tree_size == publication.tree_size)
            .where(audit_checkpoints.c.root_hash == publication.root_hash)
            .limit(1)
        ).first()
        if seen is not None:
            return False
        conn.execute(insert(audit_checkpoints).values(**asdict(publication)))
    return True


def load_publications(engine: Engine) -> list[Publication]:
    """Every recorded publication, oldest first ([] when the table does not exist)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(audit_checkpoints.name):
            return []
        rows = conn.execute(select(audit_checkpoints).order_by(audit_checkpoints.c.id))
        return [
            Publication(
                published_at=r.published_at,
                witness=r.witness,
                tree_size=r.tree_size,
                root_hash=r.root_hash,
                checkpoint=r.checkpoint,
            )
            for r in rows
        ]


# --- the anchor ----------------------------------------------------------------------------------


def read_anchor(path: Path | None) -> tuple[Anchor | None, str | None]:
    """``(anchor, None)``; ``(None, "missing" | "unreadable: ...")``; ``(None, None)`` if unused."""
    if path is None:
        return None, None
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        return None, f"unreadable: {exc.strerror}"
    try:
        return parse_anchor(text), None
    except ValueError as exc:
        return None, f"unreadable: {exc}"


def write_anchor(path: Path, anchor: Anchor) -> None:
    """Replace the anchor atomically and durably (a reader sees the old or the new, whole)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(format_anchor(anchor))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _file_lock(anchor_path: Path | None) -> Iterator[None]:
    """Hold ``<anchor>.lock`` across commit + anchor write, so racing processes keep it in order."""
    if anchor_path is None:
        yield
        return
    fd = os.open(anchor_path.with_name(anchor_path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# --- read-only access for the CLI ----------------------------------------------------------------


def _read_only_engine(db_path: Path) -> Engine:
    if not db_path.is_file():
        raise NotFound(f"no Shipyard database at {db_path}")
    uri = f"{db_path.resolve().as_uri().replace('file://', 'file:', 1)}?mode=ro"
    return create_engine(
        "sqlite://", creator=lambda: sqlite3.connect(uri, uri=True), poolclass=NullPool
    )


def _load_rows_read_only(
    db_path: Path, deployment_id: str | None = None, limit: int | None = None
) -> list[StoredRow]:
    engine = _read_only_engine(db_path)
    try:
        return _load_rows(engine, deployment_id, limit)
    finally:
        engine.dispose()


def _cause(exc: SQLAlchemyError) -> str:
    return str(getattr(exc, "orig", None) or exc)[:200]


def verify_database(
    db_path: Path, anchor_path: Path | None, leaves: list[bytes] | None = None
) -> VerifyReport:
    """Verify the trail in ``db_path`` without writing to it; NotFound if there is no database.
    ``leaves`` collects the Merkle leaf hashes of the intact records (``verify_rows``)."""
    anchor, problem = read_anchor(anchor_path)
    try:
        rows = _load_rows_read_only(db_path)
    except SQLAlchemyError as exc:
        return VerifyReport(
            ok=False, records=0, reason=f"cannot read the audit table: {_cause(exc)}"
        )
    return verify_rows(rows, anchor=anchor, anchor_state=problem, leaves=leaves)


def read_publications(db_path: Path) -> list[Publication]:
    """``load_publications`` on ``db_path``, read-only (``shipyard audit verify`` / ``prove``);
    InvalidInput if the database cannot be read."""
    engine = _read_only_engine(db_path)
    try:
        return load_publications(engine)
    except SQLAlchemyError as exc:
        raise InvalidInput(f"cannot read audit_checkpoints in {db_path}: {_cause(exc)}") from exc
    finally:
        engine.dispose()


def read_rows(db_path: Path) -> list[StoredRow]:
    """Every stored row of ``db_path``, read-only, as stored (the CLI builds the tree from
    them); InvalidInput if the database cannot be read."""
    try:
        return _load_rows_read_only(db_path)
    except SQLAlchemyError as exc:
        raise InvalidInput(f"cannot read the audit table in {db_path}: {_cause(exc)}") from exc


def read_records(
    db_path: Path, *, deployment_id: str | None = None, limit: int | None = None
) -> list[AuditRecord]:
    """Records from ``db_path``, read-only, as ``AuditLog.records`` returns them.

    NotFound without a database; CorruptRecord if a row cannot be parsed; InvalidInput if the
    database cannot be read at all.
    """
    _check_limit(limit)
    try:
        rows = _load_rows_read_only(db_path, deployment_id, limit)
    except SQLAlchemyError as exc:
        raise InvalidInput(f"cannot read the audit table in {db_path}: {_cause(exc)}") from exc
    return [to_record(row) for row in rows]
