"""``shipyard token create``: the token is stdout's last line; bad input exits 2 and says why."""

from __future__ import annotations

import stat
from pathlib import Path

import jwt
from typer.testing import CliRunner

from shipyard.api.auth import TokenAuthority
from shipyard.cli.token import token_app

runner = CliRunner()


def test_create_prints_a_token_the_server_accepts(tmp_path: Path) -> None:
    result = runner.invoke(
        token_app,
        [
            "create",
            "--data-dir",
            str(tmp_path),
            "--subject",
            "ci-bot",
            "--permission",
            "deployment:create",
            "--permission",
            "deployment:read",
        ],
    )

    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[-1]
    claims = TokenAuthority.from_data_dir(tmp_path).verify(token)
    assert claims.subject == "ci-bot"
    assert claims.permissions == {"deployment:create", "deployment:read"}
    assert "ci-bot" in result.stderr
    assert token not in result.stderr
    assert stat.S_IMODE((tmp_path / "keys" / "jwt.key").stat().st_mode) == 0o600


def test_ttl_seconds_sets_the_lifetime(tmp_path: Path) -> None:
    result = runner.invoke(
        token_app,
        [
            "create",
            "--data-dir",
            str(tmp_path),
            "--subject",
            "a",
            "--permission",
            "deployment:read",
            "--ttl-seconds",
            "90",
        ],
    )

    assert result.exit_code == 0, result.output
    payload = jwt.decode(result.stdout.splitlines()[-1], options={"verify_signature": False})
    assert payload["exp"] - payload["iat"] == 90


def test_an_unknown_permission_exits_2_listing_the_valid_ones(tmp_path: Path) -> None:
    result = runner.invoke(
        token_app,
        ["create", "--data-dir", str(tmp_path), "--subject", "a", "--permission", "admin"],
    )

    assert result.exit_code == 2
    assert "unknown permission 'admin'" in result.stderr
    for valid in ("deployment:create", "deployment:rollback", "deployment:read"):
        assert valid in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "keys").exists()


def test_a_missing_data_dir_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    result = runner.invoke(
        token_app,
        ["create", "--data-dir", str(missing), "--subject", "a", "--permission", "deployment:read"],
    )

    assert result.exit_code == 2
    assert f"data directory {missing} does not exist" in result.stderr
    assert not missing.exists()


def test_bad_ttl_and_subject_exit_2(tmp_path: Path) -> None:
    base = ["create", "--data-dir", str(tmp_path), "--permission", "deployment:read"]
    bad_ttl = runner.invoke(token_app, [*base, "--subject", "a", "--ttl-seconds", "0"])
    bad_subject = runner.invoke(token_app, [*base, "--subject", " padded"])

    assert (bad_ttl.exit_code, bad_subject.exit_code) == (2, 2)
    assert "ttl_seconds must be a positive integer" in bad_ttl.stderr
    assert "subject must be" in bad_subject.stderr


def test_at_least_one_permission_is_required(tmp_path: Path) -> None:
    result = runner.invoke(token_app, ["create", "--data-dir", str(tmp_path), "--subject", "a"])

    assert result.exit_code == 2
    assert "--permission" in result.output
