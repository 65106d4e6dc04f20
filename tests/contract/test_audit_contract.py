"""One contract, both ``AuditLog`` backends: ``SqlAuditLog`` (what ``shipyard serve`` runs, on
SQLite with its anchor and on PostgreSQL) and ``MemoryAuditLog`` (audit/fake.py, what the
orchestrator and API tests run).

Every test runs on each: appending and numbering, the hash chain, reading back, filtering by
deployment, validation, the log line, ``verify`` on an honest chain, and ``verify`` naming the
first bad record after the same tampering done to each backend's storage (raw sqlite3 with the
append-only triggers dropped, or PostgreSQL's disabled; the fake's ``rows`` list). What only
SQL has (triggers, the anchor, several writers) is tests/audit/test_log.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from sqlalchemy import Engine, text

from shipyard.audit import (
    ANCHOR_FILENAME,
    GENESIS_HASH,
    AuditEvent,
    AuditLog,
    AuditRecord,
    CorruptRecord,
    MemoryAuditLog,
    SqlAuditLog,
    VerifyReport,
)
from shipyard.audit.chain import canonical_json, format_timestamp
from shipyard.errors import InvalidInput
from shipyard.logs import JsonFormatter, RedactionFilter
from shipyard.store.engine import open_engine
from tests.audit.conftest import Ticker, make_engine
from tests.audit.conftest import sample_event as event


class VerifiableLog(AuditLog, Protocol):
    def verify(self) -> VerifyReport: ...


class Storage(Protocol):
    """Where a backend keeps its rows, as someone with access to it would edit them."""

    def update(self, seq: int, **columns: Any) -> None: ...

    def delete(self, seq: int) -> None: ...


class MemoryRows:
    def __init__(self, log: MemoryAuditLog) -> None:
        self._log = log

    def _index(self, seq: int) -> int:
        return next(i for i, row in enumerate(self._log.rows) if row.seq == seq)

    def update(self, seq: int, **columns: Any) -> None:
        i = self._index(seq)
        self._log.rows[i] = dataclasses.replace(self._log.rows[i], **columns)

    def delete(self, seq: int) -> None:
        del self._log.rows[self._index(seq)]


class SqliteRows:
    """Raw sqlite3 with the append-only triggers dropped: what an attacker with the file does."""

    def __init__(self, db: Path) -> None:
        self._db = db

    def _run(self, sql: str, params: tuple[Any, ...]) -> None:
        conn = sqlite3.connect(self._db, isolation_level=None)
        try:
            conn.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
            conn.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
            conn.execute(sql, params)
        finally:
            conn.close()

    def update(self, seq: int, **columns: Any) -> None:
        sets = ", ".join(f'"{name}" = ?' for name in columns)
        self._run(f"UPDATE audit_log SET {sets} WHERE seq = ?", (*columns.values(), seq))  # noqa: S608

    def delete(self, seq: int) -> None:
        self._run("DELETE FROM audit_log WHERE seq = ?", (seq,))


class PostgresRows:
    """The table owner's edits on PostgreSQL, its append-only triggers disabled first."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _run(self, sql: str, params: dict[str, Any]) -> None:
        with self._engine.begin() as conn:
            conn.execute(text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
            conn.execute(text(sql), params)
            conn.execute(text("ALTER TABLE audit_log ENABLE TRIGGER USER"))

    def update(self, seq: int, **columns: Any) -> None:
        sets = ", ".join(f'"{name}" = :{name}' for name in columns)
        self._run(f"UPDATE audit_log SET {sets} WHERE seq = :seq", {**columns, "seq": seq})  # noqa: S608

    def delete(self, seq: int) -> None:
        self._run("DELETE FROM audit_log WHERE seq = :seq", {"seq": seq})


@dataclass
class Backend:
    log: VerifiableLog
    storage: Storage


@pytest.fixture(params=["memory", "sql", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "memory":
        memory = MemoryAuditLog(clock=Ticker())
        yield Backend(memory, MemoryRows(memory))
        return
    if request.param == "postgresql":
        pg = open_engine(request.getfixturevalue("postgres_url"), tmp_path)
        try:
            log = SqlAuditLog(pg, tmp_path / ANCHOR_FILENAME, clock=Ticker())
            yield Backend(log, PostgresRows(pg))
        finally:
            pg.dispose()
        return
    engine = make_engine(tmp_path / "shipyard.db")
    try:
        log = SqlAuditLog(engine, tmp_path / ANCHOR_FILENAME, clock=Ticker())
        yield Backend(log, SqliteRows(tmp_path / "shipyard.db"))
    finally:
        engine.dispose()


@pytest.fixture
def audit_log(backend: Backend) -> VerifiableLog:
    return backend.log


async def test_appends_are_numbered_from_one_and_chained(audit_log: VerifiableLog) -> None:
    records = [await audit_log.append(event(n)) for n in range(3)]

    assert [r.seq for r in records] == [1, 2, 3]
    assert records[0].prev_hash == GENESIS_HASH
    assert records[1].prev_hash == records[0].hash
    assert records[2].prev_hash == records[1].hash
    assert len({r.hash for r in records}) == 3
    assert audit_log.verify() == VerifyReport(ok=True, records=3)


async def test_a_record_carries_the_event_and_the_clock_time(audit_log: VerifiableLog) -> None:
    ev = event(7, detail={"image": "sha256:abc", "nested": {"ok": True, "list": [1, 2.5, None]}})

    record = await audit_log.append(ev)

    assert record.timestamp == dt.datetime.fromtimestamp(1_700_000_001.25, dt.UTC)
    assert (record.event_type, record.deployment_id, record.service, record.region) == (
        ev.event_type,
        "dep-1",
        "web",
        "eu-west",
    )
    assert (record.user, record.status, record.duration_ms) == ("alice", "InProgress", 107)
    assert record.detail == {"image": "sha256:abc", "nested": {"ok": True, "list": [1, 2.5, None]}}


async def test_records_reads_back_exactly_what_append_returned(audit_log: VerifiableLog) -> None:
    appended = [await audit_log.append(event(n)) for n in range(4)]
    assert await audit_log.records() == appended


async def test_records_filter_by_deployment_and_limit_keeps_the_newest(
    audit_log: VerifiableLog,
) -> None:
    for n in range(6):
        await audit_log.append(event(n, deployment_id="a" if n % 2 == 0 else "b"))

    assert [r.seq for r in await audit_log.records(deployment_id="a")] == [1, 3, 5]
    assert [r.seq for r in await audit_log.records(deployment_id="b", limit=2)] == [4, 6]
    assert [r.seq for r in await audit_log.records(limit=4)] == [3, 4, 5, 6]
    assert await audit_log.records(limit=0) == []
    assert await audit_log.records(deployment_id="nope") == []
    with pytest.raises(InvalidInput):
        await audit_log.records(limit=-1)


async def test_minimal_event_has_empty_optional_fields(audit_log: VerifiableLog) -> None:
    record = await audit_log.append(AuditEvent("service.created"))
    assert record.to_dict() == {
        "seq": 1,
        "timestamp": "2023-11-14T22:13:21.250000+00:00",
        "event_type": "service.created",
        "deployment_id": None,
        "service": None,
        "region": None,
        "user": None,
        "status": None,
        "duration_ms": None,
        "detail": {},
        "prev_hash": GENESIS_HASH,
        "hash": record.hash,
    }


async def test_detail_is_stored_as_plain_json(audit_log: VerifiableLog) -> None:
    record = await audit_log.append(event(1, detail={"weights": (90, 10)}))

    assert record.detail == {"weights": [90, 10]}
    assert (await audit_log.records())[0].detail == {"weights": [90, 10]}
    assert json.loads(json.dumps(record.to_dict())) == record.to_dict()


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(AuditEvent(""), id="empty-event-type"),
        pytest.param(event(1, duration_ms=-1), id="negative-duration"),
        pytest.param(event(1, duration_ms=True), id="bool-duration"),
        pytest.param(event(1, duration_ms=1.5), id="float-duration"),
        pytest.param(event(1, service=42), id="non-text-service"),
        pytest.param(event(1, detail={"x": object()}), id="detail-not-json"),
        pytest.param(event(1, detail={"x": float("nan")}), id="detail-nan"),
        pytest.param(event(1, detail={1: "x"}), id="detail-int-key"),
        pytest.param(event(1, detail={"a": [{2: "x"}]}), id="detail-nested-int-key"),
        pytest.param(event(1, detail=["not", "a", "mapping"]), id="detail-not-mapping"),
    ],
)
async def test_invalid_events_are_refused_and_nothing_is_stored(
    audit_log: VerifiableLog, bad: AuditEvent
) -> None:
    with pytest.raises(InvalidInput):
        await audit_log.append(bad)
    assert await audit_log.records() == []
    assert (await audit_log.append(event(1))).seq == 1


async def test_concurrent_appends_get_contiguous_seqs(audit_log: VerifiableLog) -> None:
    records = await asyncio.gather(*(audit_log.append(event(n)) for n in range(25)))

    assert sorted(r.seq for r in records) == list(range(1, 26))
    assert audit_log.verify() == VerifyReport(ok=True, records=25)


@pytest.fixture
def audit_lines() -> Iterator[io.StringIO]:
    """What the ``shipyard.audit`` logger writes, as configure_logging would format it."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(RedactionFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("shipyard.audit")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield buf
    logger.removeHandler(handler)
    logger.setLevel(old_level)


async def test_each_append_logs_one_json_line_with_the_adr_fields(
    audit_log: VerifiableLog, audit_lines: io.StringIO
) -> None:
    record = await audit_log.append(event(3, detail={"api_token": "s3cr3t", "stage": "build"}))

    # One record line per append. (A PostgreSQL replica's first append also notes, on the same
    # logger, where its anchor file starts: an operational message, not a record.)
    logged = [json.loads(text) for text in audit_lines.getvalue().splitlines()]
    lines = [entry for entry in logged if entry["event"] == "audit_record"]
    assert len(lines) == 1, logged
    line = lines[0]
    assert line["logger"] == "shipyard.audit"
    assert line["level"] == "INFO"
    assert line["event"] == "audit_record"
    for key in ("event_type", "deployment_id", "service", "region", "user", "status"):
        assert line[key] == getattr(record, key)
    assert line["duration_ms"] == 103
    assert line["timestamp"] == format_timestamp(record.timestamp)
    assert (line["seq"], line["hash"]) == (1, record.hash)
    assert line["detail"] == {"api_token": "[redacted]", "stage": "build"}
    assert "s3cr3t" not in audit_lines.getvalue()


# --- tampering: the same edit to either backend's storage is named at the same record ------------


def _rehashed(record: AuditRecord, **changes: Any) -> str:
    payload = {**record.to_dict(), **changes}
    del payload["prev_hash"], payload["hash"]
    return hashlib.sha256((record.prev_hash + canonical_json(payload)).encode()).hexdigest()


def edit_field(storage: Storage, _: list[AuditRecord]) -> None:
    storage.update(3, status="Succeeded")


def edit_and_rehash(storage: Storage, records: list[AuditRecord]) -> None:
    # A smarter attacker recomputes the edited record's own hash: the next link breaks.
    storage.update(3, user="mallory", hash=_rehashed(records[2], user="mallory"))


def delete_middle(storage: Storage, _: list[AuditRecord]) -> None:
    storage.delete(3)


def swap_contents(storage: Storage, records: list[AuditRecord]) -> None:
    second, third = records[1].to_dict(), records[2].to_dict()
    for seq, r in ((2, third), (3, second)):
        storage.update(
            seq,
            timestamp=r["timestamp"],
            user=r["user"],
            duration_ms=r["duration_ms"],
            detail=canonical_json(r["detail"]),
            prev_hash=r["prev_hash"],
            hash=r["hash"],
        )


def relink(storage: Storage, records: list[AuditRecord]) -> None:
    storage.update(4, prev_hash=records[1].hash)


def backdate(storage: Storage, records: list[AuditRecord]) -> None:
    earlier = records[1].timestamp - dt.timedelta(hours=1)
    storage.update(2, timestamp=format_timestamp(earlier))


TAMPERING = [
    pytest.param(edit_field, 3, "hash does not match the record's contents", id="edit-field"),
    pytest.param(edit_and_rehash, 4, "prev_hash does not match the hash of record 3", id="rehash"),
    pytest.param(delete_middle, 3, "record 3 is missing (the next stored record is 4)", id="del-3"),
    pytest.param(swap_contents, 2, "prev_hash does not match the hash of record 1", id="swap"),
    pytest.param(relink, 4, "prev_hash does not match the hash of record 3", id="relink"),
    pytest.param(backdate, 2, "hash does not match the record's contents", id="backdate"),
]


@pytest.mark.parametrize(("tamper", "first_bad_seq", "reason"), TAMPERING)
async def test_verify_names_the_first_tampered_record(
    backend: Backend,
    tamper: Callable[[Storage, list[AuditRecord]], None],
    first_bad_seq: int,
    reason: str,
) -> None:
    records = [await backend.log.append(event(n)) for n in range(5)]
    assert backend.log.verify() == VerifyReport(ok=True, records=5)

    tamper(backend.storage, records)
    report = backend.log.verify()

    assert (report.ok, report.first_bad_seq) == (False, first_bad_seq), report
    assert report.reason is not None and reason in report.reason


async def test_a_record_that_no_longer_parses_is_refused_and_named(backend: Backend) -> None:
    for n in range(3):
        await backend.log.append(event(n))

    backend.storage.update(2, detail="{not json")

    with pytest.raises(CorruptRecord):
        await backend.log.records()
    report = backend.log.verify()
    assert (report.ok, report.first_bad_seq) == (False, 2)
