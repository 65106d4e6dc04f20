"""``shipyard serve --replica-id``: a replica's name in the leases is checked before anything
starts (a name with spaces or control characters would be shown as it is by ``driver``)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from shipyard.cli.main import app


def test_serve_refuses_a_bad_replica_id_before_starting(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["serve", "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0"],
        env={"SHIPYARD_REPLICA_ID": "replica one\x1b[2K"},
    )
    assert result.exit_code == 2, result.output
    assert "is not a replica name" in result.output
    assert not (tmp_path / "data").exists(), "nothing was started"


def test_serve_help_names_the_replica_flags() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--replica-id" in result.output and "--lease-seconds" in result.output
