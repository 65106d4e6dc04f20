"""``shipyard token create|list|revoke``: the token is stdout's last line and recorded (never
the token itself); bad input exits 2 and says why; revocations are recorded once and audited."""

from __future__ import annotations

import stat
from pathlib import Path

import jwt
import pytest
from typer.testing import CliRunner, Result

from shipyard.api.auth import PERMISSIONS, TokenAuthority
from shipyard.audit import read_records, verify_database
from shipyard.cli.token import token_app
from shipyard.store.engine import open_engine
from shipyard.store.tokens import TokenStore

runner = CliRunner()


def served(data_dir: Path) -> Path:
    """What ``shipyard serve --data-dir DATA_DIR`` leaves at its first start: the token key and
    the store (``api/context.py``)."""
    TokenAuthority.from_data_dir(data_dir)
    open_engine(None, data_dir).dispose()
    return data_dir


def test_create_prints_a_token_the_server_accepts(tmp_path: Path) -> None:
    served(tmp_path)
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
    served(tmp_path)
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
    served(tmp_path)
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


# --- the registry, the lifetime limit, scopes, list and revoke -----------------------------------


def create(tmp_path: Path, *args: str) -> Result:
    return runner.invoke(token_app, ["create", "--data-dir", str(tmp_path), *args])


def token_id_of(result: Result) -> str:
    payload = jwt.decode(result.stdout.splitlines()[-1], options={"verify_signature": False})
    token_id: str = payload["jti"]
    return token_id


def test_create_records_the_token_and_audits_it(tmp_path: Path) -> None:
    served(tmp_path)
    result = create(tmp_path, "--subject", "ci", "--permission", "deployment:read")

    assert result.exit_code == 0, result.output
    token_id = token_id_of(result)
    assert f"token {token_id} for ci" in result.stderr
    row = TokenStore(open_engine(None, tmp_path)).get(token_id)
    assert row is not None and row.subject == "ci" and row.issued_by is not None
    assert row.issued_by.startswith("local:")
    [created] = read_records(tmp_path / "shipyard.db")
    assert (created.event_type, created.detail["token_id"]) == ("token.created", token_id)
    assert verify_database(tmp_path / "shipyard.db", tmp_path / "audit.head").ok


def test_a_lifetime_over_the_default_limit_is_refused(tmp_path: Path) -> None:
    served(tmp_path)
    result = create(
        tmp_path, "--subject", "ci", "--permission", "deployment:read", "--ttl-seconds", "7776001"
    )

    assert result.exit_code == 2
    assert "longer than the maximum token lifetime, 7776000 s (90 days)" in result.stderr
    assert "shipyard serve --max-token-ttl-days N" in result.stderr
    assert result.stdout == ""
    assert TokenStore(open_engine(None, tmp_path)).list() == []


def test_the_limit_the_server_started_with_is_obeyed(tmp_path: Path) -> None:
    served(tmp_path)
    TokenStore(open_engine(None, tmp_path)).set_max_ttl_seconds(
        86400
    )  # serve --max-token-ttl-days 1
    base = ["--subject", "ci", "--permission", "deployment:read", "--ttl-seconds"]

    over = create(tmp_path, *base, "86401")
    within = create(tmp_path, *base, "86400")

    assert over.exit_code == 2
    assert "maximum token lifetime, 86400 s (1 day)" in over.stderr
    assert within.exit_code == 0, within.output


def test_scoped_permissions_are_issued_as_written(tmp_path: Path) -> None:
    served(tmp_path)
    result = create(
        tmp_path,
        "--subject",
        "ci",
        "--permission",
        "deployment:create:web-*",
        "--permission",
        "deployment:read:payments",
    )

    assert result.exit_code == 0, result.output
    payload = jwt.decode(result.stdout.splitlines()[-1], options={"verify_signature": False})
    assert payload["permissions"] == ["deployment:create:web-*", "deployment:read:payments"]


@pytest.mark.parametrize(
    ("permission", "message"),
    [
        ("deployment:create:Web-*", "is not a service name or a glob of one"),
        ("deployment:create:", "empty service scope"),
        ("token:admin:web", "'token:admin' cannot be narrowed to services"),
        ("deployment:create:web_[a]", "is not a service name"),
    ],
)
def test_bad_scoped_permissions_exit_2_and_create_nothing(
    tmp_path: Path, permission: str, message: str
) -> None:
    result = create(tmp_path, "--subject", "ci", "--permission", permission)

    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_help_lists_every_permission_and_the_scope_syntax() -> None:
    result = runner.invoke(token_app, ["create", "--help"], env={"COLUMNS": "400"})
    for permission in PERMISSIONS:
        assert permission in result.stdout
    assert "deployment:create:web-*" in result.stdout


def test_list_shows_ids_subjects_permissions_and_revocations(tmp_path: Path) -> None:
    served(tmp_path)
    ci = token_id_of(create(tmp_path, "--subject", "ci", "--permission", "deployment:create:web-*"))
    ops = token_id_of(create(tmp_path, "--subject", "ops", "--permission", "token:admin"))
    assert runner.invoke(token_app, ["revoke", ci, "--data-dir", str(tmp_path)]).exit_code == 0

    result = runner.invoke(token_app, ["list", "--data-dir", str(tmp_path)])

    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "ci" in lines[ci] and "deployment:create:web-*" in lines[ci] and "by local:" in lines[ci]
    assert "ops" in lines[ops] and "token:admin" in lines[ops] and lines[ops].rstrip()[-1] == "-"
    assert "eyJ" not in result.stdout  # no token


def test_revoke_is_recorded_once_and_says_so_the_second_time(tmp_path: Path) -> None:
    served(tmp_path)
    ci = token_id_of(create(tmp_path, "--subject", "ci", "--permission", "deployment:read"))

    first = runner.invoke(token_app, ["revoke", ci, "--data-dir", str(tmp_path)])
    second = runner.invoke(token_app, ["revoke", ci, "--data-dir", str(tmp_path)])

    assert (first.exit_code, second.exit_code) == (0, 0)
    assert f"revoked token {ci} (ci)" in first.stdout
    assert "was already revoked at" in second.stdout
    row = TokenStore(open_engine(None, tmp_path)).get(ci)
    assert row is not None and row.revoked
    events = [r.event_type for r in read_records(tmp_path / "shipyard.db")]
    assert events == ["token.created", "token.revoked"]


def test_revoking_an_unknown_id_exits_1(tmp_path: Path) -> None:
    result = runner.invoke(token_app, ["revoke", "no-such-id", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "no token with id 'no-such-id'" in result.stderr


def test_list_and_revoke_refuse_a_missing_data_dir(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    listed = runner.invoke(token_app, ["list", "--data-dir", missing])
    revoked = runner.invoke(token_app, ["revoke", "x", "--data-dir", missing])
    assert (listed.exit_code, revoked.exit_code) == (2, 2)
    assert not (tmp_path / "nope").exists()


def test_create_refuses_a_directory_no_server_has_used(tmp_path: Path) -> None:
    """No new signing key is minted: the token would be refused by the real server."""
    empty = tmp_path / "not-the-server"
    empty.mkdir()
    result = create(empty, "--subject", "ci", "--permission", "deployment:read")

    assert result.exit_code == 2
    said = " ".join(result.stderr.split())
    assert f"{empty.resolve()} holds no Shipyard server state (no keys/jwt.key)" in said
    assert "--data-dir DIR or SHIPYARD_DATA_DIR=DIR" in said
    assert f"`shipyard serve --data-dir {empty}` first" in said
    assert result.stdout == ""
    assert list(empty.iterdir()) == []


def test_create_reads_the_data_dir_from_the_environment(tmp_path: Path) -> None:
    served(tmp_path)
    result = runner.invoke(
        token_app,
        ["create", "--subject", "ci", "--permission", "deployment:read"],
        env={"SHIPYARD_DATA_DIR": str(tmp_path)},
    )

    assert result.exit_code == 0, result.output
    claims = TokenAuthority.from_data_dir(tmp_path).verify(result.stdout.splitlines()[-1])
    assert claims.subject == "ci"
