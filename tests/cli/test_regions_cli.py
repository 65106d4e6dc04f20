"""``shipyard region add|list|remove`` on a data directory: the token is stdout's last line
(after the join command once a fleet listener has run), the region is recorded and audited,
bad input exits 2 and changes nothing, an unknown region exits 1."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.test_token_cli import served
from typer.testing import CliRunner

from shipyard.audit import read_records
from shipyard.cli.regions import region_app
from shipyard.security import pki
from shipyard.store.engine import open_engine
from shipyard.store.regions import RegionStore

runner = CliRunner()


def _regions(data_dir: Path) -> list[str]:
    engine = open_engine(None, data_dir)
    try:
        return [r.name for r in RegionStore(engine).list()]
    finally:
        engine.dispose()


def test_add_prints_the_join_command_and_the_token_last(tmp_path: Path) -> None:
    served(tmp_path)
    first = runner.invoke(region_app, ["add", "eu", "--data-dir", str(tmp_path)])
    assert first.exit_code == 0, first.output
    token = pki.JoinToken.parse(first.stdout.strip().splitlines()[-1])
    assert token.fingerprint == pki.FleetPki.for_data_dir(tmp_path).fingerprint()
    assert "--fleet-listen" in first.stderr  # no listener has run: says how to start one
    assert token.secret not in first.stderr

    (tmp_path / "fleet.json").write_text(json.dumps({"url": "https://cp.example:8443"}))
    second = runner.invoke(region_app, ["add", "us", "--data-dir", str(tmp_path), "--ttl", "60"])
    assert second.exit_code == 0, second.output
    command, token_line = second.stdout.strip().splitlines()[-2:]
    assert command.startswith(f"shipyard agent --join https://cp.example:8443 --token {token_line}")
    assert _regions(tmp_path) == ["eu", "us"]

    listed = runner.invoke(region_app, ["list", "--data-dir", str(tmp_path)])
    assert listed.exit_code == 0 and "eu" in listed.stdout and "(not joined)" in listed.stdout

    assert runner.invoke(region_app, ["remove", "eu", "--data-dir", str(tmp_path)]).exit_code == 0
    assert _regions(tmp_path) == ["us"]
    events = [(r.event_type, r.region) for r in read_records(tmp_path / "shipyard.db")]
    assert ("region.added", "eu") in events and ("region.removed", "eu") in events


def test_bad_input_exits_2_and_changes_nothing(tmp_path: Path) -> None:
    never_served = runner.invoke(region_app, ["add", "eu", "--data-dir", str(tmp_path)])
    assert never_served.exit_code == 2 and "no Shipyard server state" in never_served.stderr
    served(tmp_path)
    for args in (["add", "Bad_Name"], ["add", "eu", "--ttl", "0"]):
        result = runner.invoke(region_app, [*args, "--data-dir", str(tmp_path)])
        assert result.exit_code == 2, result.output
    assert runner.invoke(region_app, ["add", "eu", "--data-dir", str(tmp_path)]).exit_code == 0
    again = runner.invoke(region_app, ["add", "eu", "--data-dir", str(tmp_path)])
    assert again.exit_code == 2 and "already registered" in again.stderr
    assert _regions(tmp_path) == ["eu"]
    unknown = runner.invoke(region_app, ["remove", "nope", "--data-dir", str(tmp_path)])
    assert unknown.exit_code == 1 and "no region 'nope'" in unknown.stderr
