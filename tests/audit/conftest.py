"""Fixtures for the audit tests: a WAL-mode SQLite engine like the store's, a stepping clock, a
sample event (also used by tests/contract/test_audit_contract.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event

from shipyard.audit import AuditEvent


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
