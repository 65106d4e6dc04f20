"""The store's schema is Alembic's: a database the release before the migrations wrote
(``fixtures/release-0.db``) upgrades and reads back; a fresh one on either backend gets the same
tables; replicas upgrading at once take turns; ``shipyard db upgrade|current``; a URL's password
is never shown."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, text
from typer.testing import CliRunner

from shipyard.audit.chain import AuditEvent
from shipyard.audit.log import ANCHOR_FILENAME, SqlAuditLog, read_records, verify_database
from shipyard.cli.main import app
from shipyard.errors import InvalidInput
from shipyard.store.db import Store
from shipyard.store.engine import (
    current_revision,
    database_url,
    head_revision,
    open_engine,
    shown_url,
    upgrade,
)
from shipyard.store.regions import RegionStore
from shipyard.store.tokens import TokenStore

from .make_release_fixture import DEPLOYMENT_ID, REVISION

FIXTURE = Path(__file__).parent / "fixtures" / "release-0.db"
TABLES = {
    "alembic_version",
    "audit_checkpoints",
    "audit_head",
    "audit_log",
    "deployments",
    "join_tokens",
    "regions",
    "leases",  # 0003_leases
    "deployment_commands",
    "active_regions",
    "app_secrets",  # 0004_secrets
    "notification_sinks",  # 0005_notifications
    "notification_outbox",
    "revisions",
    "service_scale",
    "services",
    "token_policy",
    "tokens",
}


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def released(tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copyfile(FIXTURE, data_dir / "shipyard.db")
    return data_dir


def test_the_fixture_is_a_store_from_before_the_migrations() -> None:
    conn = sqlite3.connect(f"file:{FIXTURE}?mode=ro", uri=True)
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()
    assert "alembic_version" not in names and "audit_head" not in names
    assert {"deployments", "audit_log", "tokens", "regions"} <= names


async def test_a_store_written_by_the_last_release_upgrades_and_reads_back(
    tmp_path: Path,
) -> None:
    data_dir = released(tmp_path)
    engine = open_engine(None, data_dir)
    try:
        assert current_revision(engine) == head_revision() and tables(engine) >= TABLES
        store = Store(engine)
        doc = store.get_deployment(DEPLOYMENT_ID)
        assert (doc["status"], doc["kind"]) == ("Success", "canary")
        assert store.get_revision_spec(REVISION) == {"image": "web:1"}
        service = store.get_service("web", "local")
        assert service is not None and service.serving_revision == REVISION
        scale = store.get_scale("web", "local")
        assert scale is not None and scale.replicas == 3
        assert store.count_deployments() == {("canary", "Success"): 1}
        assert [t.subject for t in TokenStore(engine).list()] == ["alice"]
        assert TokenStore(engine).max_ttl_seconds() == 90 * 86400
        assert [r.name for r in RegionStore(engine).list()] == ["eu-west"]
        # The chain goes on from the head 0002 filled in, and verifies with the old anchor.
        log = SqlAuditLog(engine, data_dir / ANCHOR_FILENAME)
        record = await log.append(AuditEvent("deployment.created", deployment_id="d-2"))
        assert record.seq == 4
        assert log.verify().ok and log.verify().records == 4
        assert [r.seq for r in read_records(data_dir / "shipyard.db")] == [1, 2, 3, 4]
    finally:
        engine.dispose()
    # The triggers of the old release still stand.
    conn = sqlite3.connect(data_dir / "shipyard.db", isolation_level=None)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM audit_log")
    finally:
        conn.close()


def test_a_store_older_still_gains_the_tables_it_lacks(tmp_path: Path) -> None:
    data_dir = released(tmp_path)
    conn = sqlite3.connect(data_dir / "shipyard.db", isolation_level=None)
    conn.execute("DROP TABLE service_scale")
    conn.execute("DROP TABLE regions")
    conn.close()
    engine = open_engine(None, data_dir)
    try:
        assert tables(engine) >= TABLES
        assert Store(engine).get_deployment(DEPLOYMENT_ID)["status"] == "Success"
    finally:
        engine.dispose()


def test_a_fresh_store_has_the_same_schema_on_both_backends(
    database: str | None, tmp_path: Path
) -> None:
    engine = open_engine(database, tmp_path)
    try:
        assert tables(engine) == TABLES
        assert current_revision(engine) == head_revision() == "0005_notifications"
        with engine.connect() as conn:
            head = conn.execute(text("SELECT id, seq, hash FROM audit_head")).all()
        assert head == [(1, 0, "0" * 64)]
        assert upgrade(engine) == head_revision()  # again: nothing to do
    finally:
        engine.dispose()


def test_replicas_upgrading_at_once_take_turns(database: str | None, tmp_path: Path) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(4, timeout=60)

    def replica() -> None:
        start.wait()
        try:
            open_engine(database, tmp_path).dispose()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    engine = open_engine(database, tmp_path, migrate=False)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


async def test_the_audit_tables_are_append_only_on_both_backends(
    database: str | None, tmp_path: Path
) -> None:
    engine = open_engine(database, tmp_path)
    try:
        log = SqlAuditLog(engine, None)
        await log.append(AuditEvent("x"))
        for sql in ("UPDATE audit_log SET status = 'x'", "DELETE FROM audit_log"):
            with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
                conn.execute(text(sql))
        assert verify_database(engine, None).ok
    finally:
        engine.dispose()


runner = CliRunner()


def test_db_current_and_upgrade_from_the_command_line(tmp_path: Path) -> None:
    data_dir = released(tmp_path)
    behind = runner.invoke(app, ["db", "current", "--data-dir", str(data_dir)])
    assert behind.exit_code == 1, behind.output
    assert "(no revision); newest: 0005_notifications" in behind.output
    done = runner.invoke(app, ["db", "upgrade", "--data-dir", str(data_dir)])
    assert done.exit_code == 0, done.output
    assert "is at 0005_notifications (newest)" in done.output
    now = runner.invoke(app, ["db", "current", "--data-dir", str(data_dir)])
    assert now.exit_code == 0 and "0005_notifications; newest: 0005_notifications" in now.output


def test_db_upgrade_on_postgresql_never_shows_the_password(postgres_url: str) -> None:
    url = postgres_url.replace("postgres@", "postgres:s3cret-pw@")  # trust auth ignores it
    done = runner.invoke(app, ["db", "upgrade", "--database", url])
    assert done.exit_code == 0, done.output
    assert "s3cret-pw" not in done.output and "***" in done.output
    down = runner.invoke(
        app, ["db", "current", "--database", "postgresql://u:s3cret-pw@127.0.0.1:1/x"]
    )
    assert down.exit_code == 2
    assert "s3cret-pw" not in down.output and "cannot use the store" in down.output


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, "sqlite:///D/shipyard.db"),
        ("postgresql://u:p@h:5432/n", "postgresql+psycopg://u:***@h:5432/n"),
        ("postgres://u:p@h/n", "postgresql+psycopg://u:***@h/n"),
        ("sqlite:////var/x.db", "sqlite:////var/x.db"),
    ],
    ids=["default-sqlite", "postgresql", "postgres-alias", "sqlite-url"],
)
def test_database_urls_are_normalised_and_masked(given: str | None, expected: str) -> None:
    assert shown_url(database_url(given, Path("D"))) == expected


@pytest.mark.parametrize(
    "given", ["mysql://u:pw@h/n", "sqlite://", "not a url :pw@"], ids=["mysql", "memory", "junk"]
)
def test_bad_database_urls_say_what_is_accepted(given: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        database_url(given, Path("D"))
    assert "pw" not in exc.value.message and "--database" in exc.value.message


def test_the_settings_repr_hides_the_database_url() -> None:
    from shipyard.settings import Settings

    settings = Settings(data_dir=Path("d"), database="postgresql://u:s3cret@h/n")
    assert "s3cret" not in repr(settings)


def test_a_store_a_newer_release_migrated_is_refused_with_what_to_do(
    database: str | None, tmp_path: Path
) -> None:
    engine = open_engine(database, tmp_path)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0099_future'"))
        with pytest.raises(
            InvalidInput, match="0099_future, which this release of Shipyard does not know"
        ):
            upgrade(engine)
    finally:
        engine.dispose()
