"""The SQLite audit trail: triggers, anchor, restarts, two processes, and tampering the way an
attacker would (the behaviour both backends share is tests/contract/test_audit_contract.py).

Tampering goes through raw sqlite3 (dropping the append-only triggers first) and must be named by
``verify`` (the log's own and the CLI's read-only ``verify_database``) at the right seq.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import hashlib
import json
import os
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from shipyard.audit import (
    ANCHOR_FILENAME,
    AuditRecord,
    CorruptRecord,
    SqlAuditLog,
    VerifyReport,
    read_records,
    verify_database,
)
from shipyard.audit.chain import canonical_json, format_timestamp, parse_anchor
from shipyard.errors import InvalidInput, NotFound

from .conftest import Ticker, make_engine
from .conftest import sample_event as event

# --- SQLite: triggers, anchor, restart, two processes --------------------------------------------


async def fill(log: SqlAuditLog, n: int) -> list[AuditRecord]:
    return [await log.append(event(i)) for i in range(n)]


def raw(db_path: Path) -> sqlite3.Connection:
    """What an attacker with the file would use (autocommit, no SQLAlchemy)."""
    return sqlite3.connect(db_path, isolation_level=None)


def drop_triggers(conn: sqlite3.Connection) -> None:
    conn.execute("DROP TRIGGER audit_log_no_update")
    conn.execute("DROP TRIGGER audit_log_no_delete")


async def test_triggers_abort_update_and_delete(engine: Engine, data_dir: Path) -> None:
    log = SqlAuditLog(engine, data_dir / ANCHOR_FILENAME, clock=Ticker())
    await fill(log, 2)
    conn = raw(data_dir / "shipyard.db")
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE audit_log SET status = 'Succeeded' WHERE seq = 1")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM audit_log WHERE seq = 2")
    finally:
        conn.close()
    with pytest.raises(IntegrityError, match="append-only"), engine.begin() as sa_conn:
        sa_conn.execute(text("DELETE FROM audit_log"))
    assert log.verify() == VerifyReport(ok=True, records=2)


async def test_a_restart_rearms_dropped_triggers_and_continues_the_chain(
    engine: Engine, data_dir: Path
) -> None:
    anchor = data_dir / ANCHOR_FILENAME
    first = await fill(SqlAuditLog(engine, anchor, clock=Ticker()), 3)
    conn = raw(data_dir / "shipyard.db")
    drop_triggers(conn)

    restarted = SqlAuditLog(engine, anchor, clock=Ticker(1_800_000_000))
    record = await restarted.append(event(9))

    assert (record.seq, record.prev_hash) == (4, first[-1].hash)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit_log WHERE seq = 1")
    conn.close()
    assert restarted.verify() == VerifyReport(ok=True, records=4)


async def test_the_anchor_holds_the_head_after_every_append(engine: Engine, data_dir: Path) -> None:
    anchor = data_dir / ANCHOR_FILENAME
    log = SqlAuditLog(engine, anchor, clock=Ticker())
    for n in range(3):
        record = await log.append(event(n))
        head = parse_anchor(anchor.read_text())
        assert (head.seq, head.hash) == (record.seq, record.hash)
    assert sorted(p.name for p in data_dir.iterdir() if "audit" in p.name) == [
        ANCHOR_FILENAME,
        ANCHOR_FILENAME + ".lock",
    ]


async def test_an_anchor_one_record_behind_is_a_crash_not_tampering(
    engine: Engine, data_dir: Path
) -> None:
    # The process died after committing record 4 and before moving the anchor past record 3.
    anchor = data_dir / ANCHOR_FILENAME
    log = SqlAuditLog(engine, anchor, clock=Ticker())
    records = await fill(log, 4)
    anchor.write_text(json.dumps({"seq": 3, "hash": records[2].hash}))

    assert log.verify() == VerifyReport(ok=True, records=4)
    assert (await log.append(event(5))).seq == 5
    assert parse_anchor(anchor.read_text()).seq == 5
    assert log.verify() == VerifyReport(ok=True, records=5)


async def test_an_append_after_tail_deletion_keeps_the_gap_visible(
    engine: Engine, data_dir: Path
) -> None:
    anchor = data_dir / ANCHOR_FILENAME
    records = await fill(SqlAuditLog(engine, anchor, clock=Ticker()), 5)
    conn = raw(data_dir / "shipyard.db")
    drop_triggers(conn)
    conn.execute("DELETE FROM audit_log WHERE seq >= 4")
    conn.close()

    record = await SqlAuditLog(engine, anchor, clock=Ticker()).append(event(6))

    assert (record.seq, record.prev_hash) == (6, records[-1].hash)
    report = verify_database(data_dir / "shipyard.db", anchor)
    assert (report.ok, report.first_bad_seq) == (False, 4)
    assert report.reason == "records 4..5 are missing (the next stored record is 6)"


async def test_two_processes_appending_at_once_do_not_fork_the_chain(
    data_dir: Path,
) -> None:
    # Two engines = two connection pools, as two processes would have; one anchor file.
    anchor = data_dir / ANCHOR_FILENAME
    engines = [make_engine(data_dir / "shipyard.db") for _ in range(2)]
    try:
        logs = [SqlAuditLog(e, anchor, clock=Ticker()) for e in engines]
        await asyncio.gather(*(logs[n % 2].append(event(n)) for n in range(40)))
        report = logs[0].verify()
    finally:
        for e in engines:
            e.dispose()

    assert report == VerifyReport(ok=True, records=40)
    assert parse_anchor(anchor.read_text()).seq == 40


async def test_an_append_holds_the_write_lock_and_the_anchor_lock_while_it_reads_the_head(
    engine: Engine, data_dir: Path
) -> None:
    # The clock is read after the head and before the insert: there, another process must be
    # unable to write (else both could chain onto the same head) or to take the anchor lock.
    db, anchor = data_dir / "shipyard.db", data_dir / ANCHOR_FILENAME
    seen: list[str] = []

    def competing_clock() -> float:
        other = sqlite3.connect(db, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            seen.append("database writable")
        except sqlite3.OperationalError as exc:
            seen.append(str(exc))
        finally:
            other.close()
        fd = os.open(anchor.with_name(anchor.name + ".lock"), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append("anchor lock free")
        except BlockingIOError:
            seen.append("anchor locked")
        finally:
            os.close(fd)
        return 1_700_000_000.0

    log = SqlAuditLog(engine, anchor, clock=competing_clock)
    await log.append(event(1))

    assert seen == ["database is locked", "anchor locked"]


async def test_records_refuses_a_row_it_cannot_parse(engine: Engine, data_dir: Path) -> None:
    log = SqlAuditLog(engine, data_dir / ANCHOR_FILENAME, clock=Ticker())
    await fill(log, 2)
    conn = raw(data_dir / "shipyard.db")
    drop_triggers(conn)
    conn.execute("UPDATE audit_log SET detail = 'not json' WHERE seq = 2")
    conn.close()

    with pytest.raises(CorruptRecord) as caught:
        await log.records()
    assert caught.value.detail["seq"] == 2
    assert log.verify() == VerifyReport(
        ok=False, records=2, first_bad_seq=2, reason="detail is not valid JSON"
    )


def test_verify_database_never_writes(data_dir: Path) -> None:
    db = data_dir / "shipyard.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE deployments (id TEXT)")
    conn.commit()
    conn.close()
    before = db.read_bytes()

    assert verify_database(db, data_dir / ANCHOR_FILENAME) == VerifyReport(ok=True, records=0)
    assert read_records(db) == []
    assert db.read_bytes() == before
    conn = sqlite3.connect(db)
    tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    conn.close()
    assert tables == [("deployments",)]


def test_verify_database_without_a_database_is_not_found(data_dir: Path) -> None:
    with pytest.raises(NotFound):
        verify_database(data_dir / "shipyard.db", None)
    assert not (data_dir / "shipyard.db").exists()


# --- tampering, one kind at a time ---------------------------------------------------------------

Tamper = Callable[[sqlite3.Connection, list[AuditRecord], Path], None]


def edit_field(conn: sqlite3.Connection, _: list[AuditRecord], __: Path) -> None:
    conn.execute("UPDATE audit_log SET status = 'Succeeded' WHERE seq = 3")


def edit_and_rehash(conn: sqlite3.Connection, records: list[AuditRecord], __: Path) -> None:
    # A smarter attacker recomputes the edited record's own hash: the next link breaks.
    r = records[2]
    payload = {**r.to_dict(), "user": "mallory"}
    del payload["prev_hash"], payload["hash"]
    new_hash = hashlib.sha256((r.prev_hash + canonical_json(payload)).encode()).hexdigest()
    conn.execute("UPDATE audit_log SET user = 'mallory', hash = ? WHERE seq = 3", (new_hash,))


def rewrite_whole_chain(conn: sqlite3.Connection, records: list[AuditRecord], __: Path) -> None:
    # The strongest attacker re-hashes every record after the edit: only the anchor knows.
    prev = records[1].hash
    for r in records[2:]:
        payload = r.to_dict()
        del payload["prev_hash"], payload["hash"]
        if r.seq == 3:
            payload["user"] = "mallory"
        new_hash = hashlib.sha256((prev + canonical_json(payload)).encode()).hexdigest()
        conn.execute(
            "UPDATE audit_log SET user = ?, prev_hash = ?, hash = ? WHERE seq = ?",
            (payload["user"], prev, new_hash, r.seq),
        )
        prev = new_hash


def delete_middle(conn: sqlite3.Connection, _: list[AuditRecord], __: Path) -> None:
    conn.execute("DELETE FROM audit_log WHERE seq = 3")


def delete_last(conn: sqlite3.Connection, _: list[AuditRecord], __: Path) -> None:
    conn.execute("DELETE FROM audit_log WHERE seq = 5")


def delete_last_two(conn: sqlite3.Connection, _: list[AuditRecord], __: Path) -> None:
    conn.execute("DELETE FROM audit_log WHERE seq >= 4")


def drop_the_table(conn: sqlite3.Connection, _: list[AuditRecord], __: Path) -> None:
    conn.execute("DROP TABLE audit_log")


def swap_contents(conn: sqlite3.Connection, _: list[AuditRecord], __: Path) -> None:
    # Rows 2 and 3 trade everything but their seq.
    cols = "timestamp, event_type, deployment_id, service, region, user, status, duration_ms, "
    cols += "detail, prev_hash, hash"
    row2 = conn.execute(f"SELECT {cols} FROM audit_log WHERE seq = 2").fetchone()  # noqa: S608
    row3 = conn.execute(f"SELECT {cols} FROM audit_log WHERE seq = 3").fetchone()  # noqa: S608
    sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
    conn.execute(f"UPDATE audit_log SET {sets} WHERE seq = 2", row3)  # noqa: S608
    conn.execute(f"UPDATE audit_log SET {sets} WHERE seq = 3", row2)  # noqa: S608


def swap_seqs(conn: sqlite3.Connection, _: list[AuditRecord], __: Path) -> None:
    conn.execute("UPDATE audit_log SET seq = 100 WHERE seq = 2")
    conn.execute("UPDATE audit_log SET seq = 2 WHERE seq = 3")
    conn.execute("UPDATE audit_log SET seq = 3 WHERE seq = 100")


def renumber_to_close_a_gap(conn: sqlite3.Connection, _: list[AuditRecord], __: Path) -> None:
    conn.execute("DELETE FROM audit_log WHERE seq = 3")
    conn.execute("UPDATE audit_log SET seq = seq - 1 WHERE seq = 4")
    conn.execute("UPDATE audit_log SET seq = seq - 1 WHERE seq = 5")


def relink(conn: sqlite3.Connection, records: list[AuditRecord], __: Path) -> None:
    conn.execute("UPDATE audit_log SET prev_hash = ? WHERE seq = 4", (records[1].hash,))


def forge_anchor(_: sqlite3.Connection, __: list[AuditRecord], anchor: Path) -> None:
    anchor.write_text(json.dumps({"seq": 5, "hash": "f" * 64}))


def delete_anchor(_: sqlite3.Connection, __: list[AuditRecord], anchor: Path) -> None:
    anchor.unlink()


def garble_anchor(_: sqlite3.Connection, __: list[AuditRecord], anchor: Path) -> None:
    anchor.write_text("{not json")


TAMPERING = [
    pytest.param(edit_field, 3, "hash does not match the record's contents", id="edit-field"),
    pytest.param(edit_and_rehash, 4, "prev_hash does not match the hash of record 3", id="rehash"),
    pytest.param(rewrite_whole_chain, 5, "does not match the anchor", id="rewrite-chain"),
    pytest.param(delete_middle, 3, "record 3 is missing (the next stored record is 4)", id="del-3"),
    pytest.param(delete_last, 5, "record 5 is missing: the anchor says", id="del-tail"),
    pytest.param(delete_last_two, 4, "records 4..5 are missing: the anchor", id="del-tail-2"),
    pytest.param(drop_the_table, 1, "records 1..5 are missing", id="drop-table"),
    pytest.param(swap_contents, 2, "prev_hash does not match the hash of record 1", id="swap"),
    pytest.param(swap_seqs, 2, "prev_hash does not match the hash of record 1", id="swap-seqs"),
    pytest.param(renumber_to_close_a_gap, 3, "prev_hash does not match", id="renumber"),
    pytest.param(relink, 4, "prev_hash does not match the hash of record 3", id="relink"),
    pytest.param(forge_anchor, 5, "hash does not match the anchor", id="forged-anchor"),
    pytest.param(delete_anchor, None, "anchor file missing", id="anchor-deleted"),
    pytest.param(garble_anchor, None, "anchor file unreadable", id="anchor-garbled"),
]


@pytest.mark.parametrize(("tamper", "first_bad_seq", "reason"), TAMPERING)
async def test_verify_names_the_first_bad_record(
    engine: Engine,
    data_dir: Path,
    tamper: Tamper,
    first_bad_seq: int | None,
    reason: str,
) -> None:
    db, anchor = data_dir / "shipyard.db", data_dir / ANCHOR_FILENAME
    log = SqlAuditLog(engine, anchor, clock=Ticker())
    records = await fill(log, 5)
    assert verify_database(db, anchor) == VerifyReport(ok=True, records=5)
    conn = raw(db)
    drop_triggers(conn)

    tamper(conn, records, anchor)
    conn.close()

    for report in (log.verify(), verify_database(db, anchor)):
        assert not report.ok
        assert report.first_bad_seq == first_bad_seq
        assert report.reason is not None
        assert reason in report.reason


# --- any single-field edit anywhere is caught ----------------------------------------------------

_text = st.text(max_size=20)
_json_scalar = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_json = st.recursive(
    _json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=6,
)
_hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)

# column -> (strategy for a new value, how to store it, how to compare it with the old one)
_EDITS: dict[str, st.SearchStrategy[Any]] = {
    "timestamp": st.datetimes(
        min_value=dt.datetime(2000, 1, 1),
        max_value=dt.datetime(2100, 1, 1),
        timezones=st.just(dt.UTC),
    ),
    "event_type": _text,
    "deployment_id": st.none() | _text,
    "service": st.none() | _text,
    "region": st.none() | _text,
    "user": st.none() | _text,
    "status": st.none() | _text,
    "duration_ms": st.none() | st.integers(min_value=0, max_value=2**53),
    "detail": st.dictionaries(_text, _json, max_size=3),
    "prev_hash": _hex64,
    "hash": _hex64,
    "seq": st.integers(min_value=100, max_value=10**9),
}


def _stored(column: str, value: Any) -> Any:
    if column == "timestamp":
        return format_timestamp(value)
    if column == "detail":
        return canonical_json(value)
    return value


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    n_records=st.integers(min_value=1, max_value=5),
    data=st.data(),
)
def test_any_single_field_edit_anywhere_is_detected(n_records: int, data: st.DataObject) -> None:
    target = data.draw(st.integers(min_value=1, max_value=n_records), label="seq")
    column = data.draw(st.sampled_from(sorted(_EDITS)), label="column")
    new_value = data.draw(_EDITS[column], label="new value")

    with tempfile.TemporaryDirectory() as tmp:
        db, anchor = Path(tmp) / "shipyard.db", Path(tmp) / ANCHOR_FILENAME
        engine = make_engine(db)
        try:
            log = SqlAuditLog(engine, anchor, clock=Ticker())
            records = asyncio.run(_fill_n(log, n_records))
            old = records[target - 1].to_dict()[column]
            if column == "timestamp":
                assume(format_timestamp(new_value) != old)
            elif column == "detail":
                assume(canonical_json(new_value) != canonical_json(old))
            else:
                assume(new_value != old)
            conn = raw(db)
            drop_triggers(conn)
            conn.execute(
                f'UPDATE audit_log SET "{column}" = ? WHERE seq = ?',  # noqa: S608
                (_stored(column, new_value), target),
            )
            conn.close()
            report = log.verify()
        finally:
            engine.dispose()

    assert not report.ok
    assert report.first_bad_seq == target, report


async def _fill_n(log: SqlAuditLog, n: int) -> list[AuditRecord]:
    return [await log.append(event(i)) for i in range(n)]


async def test_an_anchor_that_cannot_be_written_does_not_lose_the_record(
    engine: Engine, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    anchor = data_dir / ANCHOR_FILENAME
    log = SqlAuditLog(engine, anchor, clock=Ticker())
    await fill(log, 2)
    anchor.unlink()
    anchor.mkdir()  # os.replace onto a directory fails

    record = await log.append(event(3))

    assert record.seq == 3
    assert [r.seq for r in await log.records()] == [1, 2, 3]
    assert "could not be written" in caplog.text


def test_an_anchor_in_a_missing_directory_is_refused(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        SqlAuditLog(engine, tmp_path / "nope" / ANCHOR_FILENAME)
