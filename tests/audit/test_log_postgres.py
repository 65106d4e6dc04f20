"""``SqlAuditLog`` on PostgreSQL with several writers, as control-plane replicas run it: one
chain, no fork, no gap, whoever appends. Each writer has its own data directory (its own
anchor, a lagging witness of its own appends); the database's ``audit_head`` row, locked in
every append, is what serialises them. ``shipyard audit verify --database`` checks the result.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError
from typer.testing import CliRunner

from shipyard.audit import ANCHOR_FILENAME, AuditEvent, SqlAuditLog, VerifyReport
from shipyard.audit.chain import GENESIS_HASH
from shipyard.audit.log import read_records, verify_database
from shipyard.cli.main import app
from shipyard.store.engine import open_engine

from .conftest import Ticker

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture
def engine(postgres_url: str, tmp_path: Path) -> Iterator[Engine]:
    e = open_engine(postgres_url, tmp_path)
    yield e
    e.dispose()


def replica_dir(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


def assert_one_chain(engine: Engine, count: int) -> None:
    records = read_records(engine)
    assert [r.seq for r in records] == list(range(1, count + 1))  # no gap, no duplicate
    prevs = [r.prev_hash for r in records]
    assert len(set(prevs)) == count  # no fork: no two records chained onto one head
    assert prevs[0] == GENESIS_HASH
    assert verify_database(engine, None) == VerifyReport(ok=True, records=count)
    with engine.connect() as conn:
        head = conn.execute(text("SELECT seq, hash FROM audit_head")).one()
    assert tuple(head) == (count, records[-1].hash)


def test_writers_in_threads_make_one_chain(
    engine: Engine, postgres_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writers, each = 4, 15
    start = threading.Barrier(writers, timeout=60)
    errors: list[BaseException] = []

    def replica(i: int) -> None:
        own = open_engine(postgres_url, tmp_path)  # its own pool, as another process has
        try:
            log = SqlAuditLog(own, replica_dir(tmp_path, f"r{i}") / ANCHOR_FILENAME, Ticker())
            start.wait()
            for n in range(each):
                asyncio.run(log.append(AuditEvent("test.appended", user=f"r{i}", detail={"n": n})))
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert_one_chain(engine, writers * each)
    # A replica's anchor starting behind the others' records is how replicas work, no alarm.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    # Every replica's anchor lags behind the head or is at it, and names a record of the chain.
    for i in range(writers):
        assert verify_database(engine, tmp_path / f"r{i}" / ANCHOR_FILENAME).ok


def test_two_processes_make_one_chain_and_audit_verify_says_so(
    engine: Engine, postgres_url: str, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.audit.append_worker",
                postgres_url,
                str(replica_dir(tmp_path, name)),
                "40",
                name,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "done", err[-2000:]
    assert_one_chain(engine, 80)
    users = {r.user for r in read_records(engine)}
    assert users == {"a", "b"}
    done = runner.invoke(app, ["audit", "verify", "--database", postgres_url])
    assert done.exit_code == 0, done.output
    assert "audit trail intact: 80 records" in done.output
    # With a replica's data directory, its anchor is checked too.
    with_anchor = runner.invoke(
        app, ["audit", "verify", "--database", postgres_url, "--data-dir", str(tmp_path / "a")]
    )
    assert with_anchor.exit_code == 0, with_anchor.output
    shown = runner.invoke(app, ["audit", "show", "--database", postgres_url, "--limit", "2"])
    assert shown.exit_code == 0 and "test.appended" in shown.output


async def test_an_append_holds_the_head_row_while_it_chains(
    engine: Engine, postgres_url: str, tmp_path: Path
) -> None:
    # The clock is read after the head and before the insert: another writer must not be able
    # to take the head there (else both could chain onto it).
    other = create_engine(postgres_url)
    seen: list[str] = []

    def competing_clock() -> float:
        with other.connect() as conn:
            try:
                conn.execute(text("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE NOWAIT"))
                seen.append("head free")
            except OperationalError as exc:
                seen.append("locked" if "could not obtain lock" in str(exc) else str(exc))
        return 1_700_000_000.0

    try:
        log = SqlAuditLog(engine, tmp_path / ANCHOR_FILENAME, clock=competing_clock)
        await log.append(AuditEvent("test.appended"))
    finally:
        other.dispose()
    assert seen == ["locked"]


async def test_audit_verify_catches_the_newest_records_deleted(
    engine: Engine, postgres_url: str, tmp_path: Path
) -> None:
    log = SqlAuditLog(engine, None, clock=Ticker())
    for n in range(5):
        await log.append(AuditEvent("test.appended", detail={"n": n}))
    with engine.begin() as conn:  # the table's owner, triggers off: no anchor file to tell
        conn.execute(text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
        conn.execute(text("DELETE FROM audit_log WHERE seq >= 4"))
        conn.execute(text("ALTER TABLE audit_log ENABLE TRIGGER USER"))
    done = runner.invoke(app, ["audit", "verify", "--database", postgres_url])
    assert done.exit_code == 1
    assert "first bad record 4: records 4..5 are missing: audit_head says" in done.output
    # The next append keeps the gap visible rather than reusing seq 4.
    record = await log.append(AuditEvent("test.appended"))
    assert record.seq == 6


def test_audit_verify_without_data_dir_or_database_says_what_to_pass() -> None:
    done = runner.invoke(app, ["audit", "verify"], env={"SHIPYARD_DATABASE": ""})
    assert done.exit_code == 2 and "--data-dir DIR or --database URL" in done.output


async def test_a_start_rearms_a_dropped_or_disabled_trigger(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    await SqlAuditLog(engine, None, clock=Ticker()).append(AuditEvent("test.appended"))
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER audit_log_no_delete ON audit_log"))
        conn.execute(text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update"))
    SqlAuditLog(engine, None)
    assert "audit_log_no_delete, audit_log_no_update" in caplog.text
    for sql in ("DELETE FROM audit_log", "UPDATE audit_log SET status = 'x'"):
        with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
            conn.execute(text(sql))
