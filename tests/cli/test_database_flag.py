"""``--database`` / ``SHIPYARD_DATABASE`` end to end: a real ``shipyard serve`` on PostgreSQL, and
the store-reading commands (``token``, ``region``, ``audit``, ``db``) pointed at the same store.
The URL's password never shows in output or the server's log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.e2e.support import Server
from typer.testing import CliRunner

from shipyard.cli.main import app
from shipyard.store.engine import open_engine
from shipyard.store.tokens import TokenStore

runner = CliRunner()
SECRET = "s3cret-pw"  # the throw-away cluster trusts local connections: any password works


@pytest.fixture
def url(postgres_url: str) -> str:
    return postgres_url.replace("postgres@", f"postgres:{SECRET}@")


@pytest.fixture
def server(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("SHIPYARD_DATABASE", url)  # serve, and the fixture's own token
    s = Server(tmp_path / "data")
    try:
        yield s.start()
    finally:
        s.stop()
        s.stop_agent()


def test_serve_and_the_cli_share_a_postgresql_store(server: Server, url: str) -> None:
    assert server.client is not None
    assert server.client.get("/api/v1/deployments").status_code == 200
    log = (server.data_dir / "serve.log").read_text()
    assert SECRET not in log and "store postgresql+psycopg://postgres:***@" in log
    assert not (server.data_dir / "shipyard.db").exists()  # nothing went to SQLite

    engine = open_engine(url, server.data_dir, migrate=False)
    try:
        assert [t.subject for t in TokenStore(engine).list()] == ["e2e"]
    finally:
        engine.dispose()
    data = ["--data-dir", str(server.data_dir), "--database", url]
    listed = runner.invoke(app, ["token", "list", *data])
    assert listed.exit_code == 0 and "e2e" in listed.output, listed.output
    added = runner.invoke(app, ["region", "add", "eu", *data])
    assert added.exit_code == 0, added.output
    regions = runner.invoke(app, ["region", "list", *data])
    assert regions.exit_code == 0 and "eu" in regions.output
    verified = runner.invoke(app, ["audit", "verify", *data])
    assert verified.exit_code == 0 and "audit trail intact" in verified.output, verified.output
    current = runner.invoke(app, ["db", "current", "--database", url])
    assert current.exit_code == 0 and SECRET not in current.output
    for result in (listed, added, regions, verified, current):
        assert SECRET not in result.output


def test_serve_refuses_a_database_it_cannot_use_before_starting(tmp_path: Path) -> None:
    done = runner.invoke(
        app,
        [
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--listen",
            "127.0.0.1:0",
            "--database",
            f"mysql://root:{SECRET}@db/shipyard",
        ],
    )
    said = " ".join(done.output.split())  # the console wraps long lines
    assert done.exit_code == 2
    assert "PostgreSQL (postgresql://...) or SQLite" in said and SECRET not in said
    assert not (tmp_path / "data").exists(), "nothing was started"


def test_a_store_command_on_a_database_that_does_not_answer_exits_2(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "jwt.key").write_bytes(b"k" * 32)
    done = runner.invoke(
        app,
        [
            "token",
            "list",
            "--data-dir",
            str(tmp_path),
            "--database",
            f"postgresql://u:{SECRET}@127.0.0.1:1/x",
        ],
    )
    said = " ".join(done.output.split())
    assert done.exit_code == 2
    assert "cannot use the store postgresql+psycopg://u:***@127.0.0.1:1/x" in said
    assert SECRET not in said
