"""Fixtures for the audit tests: a WAL-mode SQLite engine like the store's, a stepping clock, a
sample event (also used by tests/contract/test_audit_contract.py), and the host attacker's two
moves, ``rewrite_history`` and ``truncate_history`` (also used by tests/cli/test_audit_cli.py)."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event

from shipyard.audit import GENESIS_HASH, AuditEvent
from shipyard.audit.chain import Anchor, StoredRow, make_row, to_record
from shipyard.audit.log import write_anchor
from shipyard.store.engine import upgrade


class Ticker:
    """A clock that moves 1.25 s every time it is read: distinct, predictable timestamps."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.25
        return self.now


def make_engine(db_path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{db_path}")

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=5000")
        cur.close()

    upgrade(engine)  # the store's migrations make the audit tables
    return engine


def sample_event(n: int, deployment_id: str = "dep-1", **overrides: Any) -> AuditEvent:
    """A stage-completed event; ``n`` makes each one different."""
    fields: dict[str, Any] = {
        "event_type": "deployment.stage_completed",
        "deployment_id": deployment_id,
        "service": "web",
        "region": "eu-west",
        "user": "alice",
        "status": "InProgress",
        "duration_ms": 100 + n,
        "detail": {"stage": f"stage-{n}", "attempt": n},
    }
    fields.update(overrides)
    return AuditEvent(**fields)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def engine(data_dir: Path) -> Iterator[Engine]:
    e = make_engine(data_dir / "shipyard.db")
    yield e
    e.dispose()


def rewrite_history(db_path: Path, anchor_path: Path, seq: int, **changes: Any) -> None:
    """What a host attacker with write access to the data directory does: edit record ``seq``
    (``changes`` are AuditEvent fields), re-hash the chain from there on, move the anchor and the
    database's ``audit_head``. The chain and both heads then check out; only a checkpoint
    published elsewhere can tell."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        conn.row_factory = sqlite3.Row
        rows = [StoredRow(**dict(r)) for r in conn.execute("SELECT * FROM audit_log ORDER BY seq")]
        prev = GENESIS_HASH
        for row in rows:
            record = to_record(row)
            event = AuditEvent(
                event_type=record.event_type,
                deployment_id=record.deployment_id,
                service=record.service,
                region=record.region,
                user=record.user,
                status=record.status,
                duration_ms=record.duration_ms,
                detail=record.detail,
            )
            if row.seq == seq:
                event = dataclasses.replace(event, **changes)
            new = make_row(row.seq, record.timestamp, event, prev)
            conn.execute(
                "UPDATE audit_log SET user = ?, status = ?, detail = ?, prev_hash = ?, hash = ? "
                "WHERE seq = ?",
                (new.user, new.status, new.detail, new.prev_hash, new.hash, row.seq),
            )
            prev = new.hash
        conn.execute("UPDATE audit_head SET hash = ? WHERE id = 1", (prev,))
    finally:
        conn.close()
    write_anchor(anchor_path, Anchor(seq=rows[-1].seq, hash=prev))


def truncate_history(db_path: Path, anchor_path: Path, keep: int) -> None:
    """Delete every record after ``keep`` and move the anchor and ``audit_head`` back to match."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
        conn.execute("DELETE FROM audit_log WHERE seq > ?", (keep,))
        (digest,) = conn.execute("SELECT hash FROM audit_log WHERE seq = ?", (keep,)).fetchone()
        conn.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (keep, digest))
    finally:
        conn.close()
    write_anchor(anchor_path, Anchor(seq=keep, hash=digest))
