"""The audit log: the ``AuditLog`` protocol and its SQL backend, ``SqlAuditLog``.

The orchestrator appends one record per deployment action; ``shipyard audit verify`` / ``show``
(cli/audit.py) read the database read-only through ``verify_database`` / ``read_records``.

``SqlAuditLog`` keeps its own tables in the deployment store's database, SQLite or PostgreSQL
(the store's migrations make them, with triggers that abort UPDATE and DELETE on them, which
it re-arms at every start):
``audit_log``, the chain; ``audit_head``, one row with the newest seq and hash; and
``audit_checkpoints``, the checkpoints the publisher (publishing.py) got a witness to accept.

Several processes may append to one chain (control-plane replicas on one PostgreSQL, a CLI
beside a server). Each append is ONE transaction that locks the head row (``SELECT ... FOR
UPDATE``; on SQLite ``BEGIN IMMEDIATE`` locks the whole database), reads the previous record
from it, inserts the next and moves the head: no two writers read the same head, so the chain
cannot fork and seqs have no gap. In the process an ``asyncio.Lock`` queues appends before they
take a connection, and a lock file beside the anchor keeps each data directory's anchor
(``<data_dir>/audit.head``, the newest seq and hash this replica wrote) from moving backwards.
The anchor is written after the commit (temp file, fsync, ``os.replace``, fsync of the
directory); a crash in between leaves it one record behind, and another replica's appends leave
it further behind: verification accepts an anchor that lags, and checks the chain holds the
hash it names.

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
    CheckConstraint,
    Column,
    Connection,
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
    update,
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

#: The chain's head: one row (id 1), the newest record's seq and hash (seq 0 and the genesis
#: hash before the first). Locked by every append (module docstring); migration 0002 made it.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    CheckConstraint("id = 1", name="ck_audit_head_one_row"),
)


#: Defence in depth, re-armed at every start (the chain still catches whoever drops them
#: first). The same triggers as migration 0001_baseline's, which made them.
APPEND_ONLY = ("audit_log", "audit_checkpoints")
_PG_FUNCTION = (
    "CREATE OR REPLACE FUNCTION shipyard_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN RAISE EXCEPTION USING MESSAGE = TG_TABLE_NAME || ' is append-only'; END $$"
)


def _triggers(dialect: str) -> list[str]:
    if dialect == "postgresql":
        return [_PG_FUNCTION] + [
            f"CREATE OR REPLACE TRIGGER {table}_no_{kind} BEFORE {kind.upper()} ON {table} "
            f"FOR EACH {'STATEMENT' if kind == 'truncate' else 'ROW'} "
            "EXECUTE FUNCTION shipyard_append_only()"
            for table in APPEND_ONLY
            for kind in ("update", "delete", "truncate")
        ]
    return [
        f"CREATE TRIGGER IF NOT EXISTS {table}_no_{kind} BEFORE {kind.upper()} ON {table} "
        f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
        for table in APPEND_ONLY
        for kind in ("update", "delete")
    ]


#: PostgreSQL advisory lock key serialising the re-arm of replicas starting together (their
#: concurrent ``CREATE OR REPLACE`` of one trigger fails with "tuple concurrently updated").
_REARM_LOCK = 0x5348_4950_4155_4454


def _rearm_triggers(conn: Connection) -> None:
    """Put back an append-only trigger someone dropped (or, on PostgreSQL, disabled). DDL only
    when one is missing: a start that finds them all in place takes no table lock."""
    if conn.dialect.name != "postgresql":
        for ddl in _triggers("sqlite"):
            conn.exec_driver_sql(ddl)
        return
    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_REARM_LOCK})")
    enabled = {
        str(name)
        for (name,) in conn.exec_driver_sql(
            "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgenabled <> 'D' AND "
            "tgrelid IN ('audit_log'::regclass, 'audit_checkpoints'::regclass)"
        )
    }
    wanted = {f"{t}_no_{k}" for t in APPEND_ONLY for k in ("update", "delete", "truncate")}
    if wanted <= enabled:
        return
    _logger.error(
        "audit append-only triggers missing or disabled (%s): re-armed",
        ", ".join(sorted(wanted - enabled)),
    )
    for ddl in _triggers("postgresql"):
        conn.exec_driver_sql(ddl)
    for table in APPEND_ONLY:
        conn.exec_driver_sql(f"ALTER TABLE {table} ENABLE TRIGGER USER")


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
    """``AuditLog`` in the deployment store's database (an engine from ``store.engine``, so
    migrated), anchored by ``anchor_path`` (this replica's data directory)."""

    def __init__(
        self,
        engine: Engine,
        anchor_path: Path | None,
        clock: Callable[[], float] = time.time,
        *,
        fence: Callable[[Connection], None] | None = None,
        on_append: Callable[[Connection, AuditRecord], None] | None = None,
    ) -> None:
        """``fence``: called inside every append's transaction before it writes (the store's
        ``leases.check_fence``: a replica whose lease moved on appends nothing). ``on_append``:
        called inside the same transaction right after the record is inserted, with it (the
        notification outbox writer, ``notify/sinks.OutboxWriter``: its rows commit with the
        record or not at all; whatever it raises aborts the append)."""
        if engine.dialect.name not in {"sqlite", "postgresql"}:
            raise InvalidInput(
                f"SqlAuditLog runs on SQLite or PostgreSQL, not {engine.dialect.name}"
            )
        if anchor_path is not None and not anchor_path.parent.is_dir():
            raise InvalidInput(f"audit anchor directory {anchor_path.parent} does not exist")
        self._engine = engine
        self._anchor_path = anchor_path
        self._clock = clock
        self._fence = fence
        self._on_append = on_append
        self._lock = asyncio.Lock()
        with engine.begin() as conn:
            if not inspect(conn).has_table(audit_head.name):
                raise InvalidInput(
                    "the store has no audit tables: open it with store.engine.open_engine "
                    "(or run `shipyard db upgrade`)"
                )
            _rearm_triggers(conn)

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
        return verify_database(self._engine, self._anchor_path)

    def _append_blocking(self, event: AuditEvent) -> AuditRecord:
        with _file_lock(self._anchor_path):
            anchor, problem = read_anchor(self._anchor_path)
            with self._engine.connect() as conn:
                if conn.dialect.name == "sqlite":
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                if self._fence is not None:  # the lease first, then the head: one lock order
                    self._fence(conn)
                prev = _lock_head(conn)
                if anchor is not None and anchor.seq >= prev.seq and anchor != prev:
                    _logger.error(
                        "audit database head (seq %d) is behind or differs from its anchor "
                        "(seq %d): chaining onto the anchor so the gap stays visible; run "
                        "`shipyard audit verify`",
                        prev.seq,
                        anchor.seq,
                    )
                    prev = anchor
                elif problem == "missing" and conn.dialect.name == "postgresql":
                    # Replicas share the chain, not anchors: a replica's first append (a new
                    # data directory) finds records the others wrote. Its anchor starts here.
                    _logger.info(
                        "audit anchor %s starts at seq %d", self._anchor_path, prev.seq + 1
                    )
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
                if self._on_append is not None:
                    self._on_append(conn, to_record(row))
                conn.execute(
                    update(audit_head)
                    .where(audit_head.c.id == 1)
                    .values(seq=row.seq, hash=row.hash)
                )
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


def _lock_head(conn: Connection) -> Anchor:
    """The chain's head, its row locked until ``conn``'s transaction ends. A store whose head
    row is gone (deleted by hand: the table has no trigger, its lock is its job) gets it back
    from the newest record, loudly."""
    head = conn.execute(
        select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1).with_for_update()
    ).first()
    if head is not None:
        return Anchor(seq=int(head[0]), hash=str(head[1]))
    newest = conn.execute(
        select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
    ).first()
    found = Anchor(seq=int(newest[0]), hash=str(newest[1])) if newest else Anchor(0, GENESIS_HASH)
    _logger.error(
        "the audit_head row is missing: restored from the newest record (seq %d)", found.seq
    )
    conn.execute(insert(audit_head).values(id=1, seq=found.seq, hash=found.hash))
    return found


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


def record_publication(
    engine: Engine,
    publication: Publication,
    on_publish: Callable[[Connection, Publication], None] | None = None,
) -> bool:
    """Store ``publication`` unless this witness already has this tree size recorded: True if
    stored. Called by the publisher after a witness accepted a checkpoint. ``on_publish``: run
    in the same transaction when it is stored (the notification outbox writer)."""
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
        if on_publish is not None:
            on_publish(conn, publication)
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

#: What the read-only functions read: a SQLite file (opened ``mode=ro`` here), or an engine the
#: caller opened (``store.engine.open_read_only``: PostgreSQL with read-only transactions).
Source = Path | Engine


@contextlib.contextmanager
def _reading(source: Source) -> Iterator[Engine]:
    if isinstance(source, Engine):
        yield source
        return
    if not source.is_file():
        raise NotFound(f"no Shipyard database at {source}")
    uri = f"{source.resolve().as_uri().replace('file://', 'file:', 1)}?mode=ro"
    engine = create_engine(
        "sqlite://", creator=lambda: sqlite3.connect(uri, uri=True), poolclass=NullPool
    )
    try:
        yield engine
    finally:
        engine.dispose()


def _where(source: Source) -> str:
    if isinstance(source, Engine):
        return source.url.render_as_string(hide_password=True)
    return str(source)


def _load_rows_read_only(
    source: Source, deployment_id: str | None = None, limit: int | None = None
) -> list[StoredRow]:
    with _reading(source) as engine:
        return _load_rows(engine, deployment_id, limit)


def _cause(exc: SQLAlchemyError) -> str:
    return str(getattr(exc, "orig", None) or exc)[:200]


def _read_head(engine: Engine) -> Anchor | None:
    """``audit_head`` as stored (None before migration 0002, or if its row is gone)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(audit_head.name):
            return None
        row = conn.execute(select(audit_head.c.seq, audit_head.c.hash)).first()
    return Anchor(seq=int(row[0]), hash=str(row[1])) if row else None


def verify_database(
    source: Source, anchor_path: Path | None, leaves: list[bytes] | None = None
) -> VerifyReport:
    """Verify the trail in ``source`` without writing to it; NotFound if there is no database.
    ``leaves`` collects the Merkle leaf hashes of the intact records (``verify_rows``).

    Besides the anchor file (this replica's lagging witness; None: no data directory, as on a
    machine that only holds ``--database``), the database's own ``audit_head`` must name a record
    of the chain with its hash: it is read before the rows, so it may lag, never lead."""
    anchor, problem = read_anchor(anchor_path)
    try:
        with _reading(source) as engine:
            head = _read_head(engine)
            rows = _load_rows(engine)
    except SQLAlchemyError as exc:
        return VerifyReport(
            ok=False, records=0, reason=f"cannot read the audit table: {_cause(exc)}"
        )
    report = verify_rows(rows, anchor=anchor, anchor_state=problem, leaves=leaves)
    if not report.ok or head is None or head.seq == 0:
        return report
    # The chain is intact to its end; the head row must name one of its records.
    if head.seq > len(rows):
        first = len(rows) + 1
        gone = f"record {first} is" if head.seq == first else f"records {first}..{head.seq} are"
        return VerifyReport(
            ok=False,
            records=report.records,
            first_bad_seq=first,
            reason=f"{gone} missing: audit_head says the trail ends at seq {head.seq}",
        )
    if rows[head.seq - 1].hash != head.hash:
        return VerifyReport(
            ok=False,
            records=report.records,
            first_bad_seq=head.seq,
            reason="hash does not match audit_head (the head was rewritten)",
        )
    return report


def read_publications(source: Source) -> list[Publication]:
    """``load_publications`` on ``source``, read-only (``shipyard audit verify`` / ``prove``);
    InvalidInput if the database cannot be read."""
    try:
        with _reading(source) as engine:
            return load_publications(engine)
    except SQLAlchemyError as exc:
        raise InvalidInput(
            f"cannot read audit_checkpoints in {_where(source)}: {_cause(exc)}"
        ) from exc


def read_rows(source: Source) -> list[StoredRow]:
    """Every stored row of ``source``, read-only, as stored (the CLI builds the tree from
    them); InvalidInput if the database cannot be read."""
    try:
        return _load_rows_read_only(source)
    except SQLAlchemyError as exc:
        raise InvalidInput(
            f"cannot read the audit table in {_where(source)}: {_cause(exc)}"
        ) from exc


def read_records(
    source: Source, *, deployment_id: str | None = None, limit: int | None = None
) -> list[AuditRecord]:
    """Records from ``source``, read-only, as ``AuditLog.records`` returns them.

    NotFound without a database; CorruptRecord if a row cannot be parsed; InvalidInput if the
    database cannot be read at all.
    """
    _check_limit(limit)
    try:
        rows = _load_rows_read_only(source, deployment_id, limit)
    except SQLAlchemyError as exc:
        raise InvalidInput(
            f"cannot read the audit table in {_where(source)}: {_cause(exc)}"
        ) from exc
    return [to_record(row) for row in rows]
