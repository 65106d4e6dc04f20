"""``shipyard audit verify`` / ``show`` against a real trail written by SqlAuditLog."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shipyard.audit import AuditEvent, SqlAuditLog
from shipyard.cli.audit import audit_app
from shipyard.store.db import Store
from shipyard.store.engine import open_engine

runner = CliRunner()


def write_trail(data_dir: Path, deployments: list[str]) -> None:
    engine = open_engine(None, data_dir)
    try:
        log = SqlAuditLog(engine, data_dir / "audit.head")

        async def append_all() -> None:
            for n, deployment in enumerate(deployments):
                await log.append(
                    AuditEvent(
                        f"stage.{n}",
                        deployment_id=deployment,
                        service="web",
                        region="eu-west",
                        user="alice",
                        status="InProgress",
                        duration_ms=10 * n,
                    )
                )

        asyncio.run(append_all())
    finally:
        engine.dispose()


def tamper(data_dir: Path, sql: str) -> None:
    conn = sqlite3.connect(data_dir / "shipyard.db", isolation_level=None)
    conn.execute("DROP TRIGGER audit_log_no_update")
    conn.execute("DROP TRIGGER audit_log_no_delete")
    conn.execute(sql)
    conn.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    write_trail(tmp_path, ["d-1", "d-2", "d-1", "d-1"])
    return tmp_path


def test_verify_an_intact_trail(data_dir: Path) -> None:
    result = runner.invoke(audit_app, ["verify", "--data-dir", str(data_dir)])

    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "audit trail intact: 4 records\n"
        "no checkpoint was published to a witness for records 1..4; only internal consistency "
        "is proven (run `shipyard serve --witness PATH_OR_URL`)\n"
    )


def test_verify_names_an_edited_record(data_dir: Path) -> None:
    tamper(data_dir, "UPDATE audit_log SET user = 'mallory' WHERE seq = 2")

    result = runner.invoke(audit_app, ["verify", "--data-dir", str(data_dir)])

    assert result.exit_code == 1
    assert "first bad record 2: hash does not match the record's contents" in result.stdout


def test_verify_names_a_deleted_tail(data_dir: Path) -> None:
    tamper(data_dir, "DELETE FROM audit_log WHERE seq = 4")

    result = runner.invoke(audit_app, ["verify", "--data-dir", str(data_dir)])

    assert result.exit_code == 1
    assert "first bad record 4: record 4 is missing" in result.stdout


def test_verify_without_a_data_dir_or_database_exits_2(tmp_path: Path) -> None:
    missing = runner.invoke(audit_app, ["verify", "--data-dir", str(tmp_path / "nope")])
    empty = runner.invoke(audit_app, ["verify", "--data-dir", str(tmp_path)])

    assert (missing.exit_code, empty.exit_code) == (2, 2)
    assert "does not exist" in missing.stderr
    assert "no Shipyard database" in empty.stderr
    assert not (tmp_path / "shipyard.db").exists()


def test_show_as_json_filters_by_deployment(data_dir: Path) -> None:
    result = runner.invoke(
        audit_app, ["show", "--data-dir", str(data_dir), "--deployment", "d-1", "--format", "json"]
    )

    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert [r["seq"] for r in records] == [1, 3, 4]
    assert {r["deployment_id"] for r in records} == {"d-1"}
    assert set(records[0]) >= {"timestamp", "event_type", "user", "status", "duration_ms", "hash"}


def test_show_limit_keeps_the_newest(data_dir: Path) -> None:
    result = runner.invoke(
        audit_app, ["show", "--data-dir", str(data_dir), "--limit", "2", "--format", "json"]
    )

    assert [r["seq"] for r in json.loads(result.stdout)] == [3, 4]


def test_show_as_a_table(data_dir: Path) -> None:
    result = runner.invoke(audit_app, ["show", "--data-dir", str(data_dir)])

    assert result.exit_code == 0, result.output
    for text in ("stage.0", "stage.3", "d-2", "eu-west", "alice", "4 records"):
        assert text in result.stdout


def test_show_refuses_an_unknown_format(data_dir: Path) -> None:
    result = runner.invoke(audit_app, ["show", "--data-dir", str(data_dir), "--format", "xml"])
    assert result.exit_code == 2


def test_show_reports_a_record_it_cannot_read(data_dir: Path) -> None:
    tamper(data_dir, "UPDATE audit_log SET detail = '[' WHERE seq = 3")

    result = runner.invoke(audit_app, ["show", "--data-dir", str(data_dir)])

    assert result.exit_code == 1
    assert "audit record 3 cannot be read: detail is not valid JSON" in result.stderr


def _with_deployments(data_dir: Path, *ids: str) -> None:
    """Deployments in the store (the audit filter resolves prefixes among them)."""
    store = Store(open_engine(None, data_dir))
    for n, dep_id in enumerate(ids):
        store.create_deployment(
            {"id": dep_id, "service": f"s{n}", "region": "local", "status": "Success",
             "created_ts": float(n)},
            active=False,
        )  # fmt: skip
    store.engine.dispose()


def test_show_takes_a_unique_prefix_of_a_deployment_id(tmp_path: Path) -> None:
    full, other = "c0ffee00-1111-4111-8111-111111111111", "c0ff0000-2222-4222-8222-222222222222"
    _with_deployments(tmp_path, full, other)
    write_trail(tmp_path, [full, other, full])

    result = runner.invoke(
        audit_app,
        ["show", "--data-dir", str(tmp_path), "--deployment", "c0ffee", "--format", "json"],
    )

    assert result.exit_code == 0, result.output
    assert [r["seq"] for r in json.loads(result.stdout)] == [1, 3]


def test_show_refuses_an_ambiguous_prefix_listing_both(tmp_path: Path) -> None:
    full, other = "c0ffee00-1111-4111-8111-111111111111", "c0ff0000-2222-4222-8222-222222222222"
    _with_deployments(tmp_path, full, other)
    write_trail(tmp_path, [full, other])

    result = runner.invoke(audit_app, ["show", "--data-dir", str(tmp_path), "--deployment", "c0ff"])

    assert result.exit_code == 2
    assert full in result.stderr and other in result.stderr
    assert "ambiguous" in result.stderr
