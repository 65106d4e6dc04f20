"""``--shared-dir`` on the commands that read keys or the fleet CA (``token``, ``region``,
``keys``), and ``serve``'s refusals of ``--shared-dir``/``--local-agent`` mistakes before
anything starts."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from shipyard.api.auth import TokenAuthority
from shipyard.api.fleet import announce, listener_urls
from shipyard.cli.keys import keys_app
from shipyard.cli.main import app as cli
from shipyard.cli.regions import region_app
from shipyard.cli.token import token_app
from shipyard.security import pki, signing

runner = CliRunner()


def _replica(tmp_path: Path) -> tuple[Path, Path]:
    """What ``serve --data-dir DATA --shared-dir SHARED`` leaves that matters here: the keys in
    SHARED, none in DATA."""
    data, shared = tmp_path / "data", tmp_path / "shared"
    data.mkdir()
    shared.mkdir()
    TokenAuthority.from_data_dir(shared)
    signing.Ed25519Signer.load_or_create(shared)
    return data, shared  # the store is made by the first command that opens it


def test_token_create_signs_with_the_shared_key(tmp_path: Path) -> None:
    data, shared = _replica(tmp_path)
    args = ["create", "--data-dir", str(data), "--subject", "ci", "--permission", "deployment:read"]
    refused = runner.invoke(token_app, args)
    assert refused.exit_code == 2
    assert "SHIPYARD_SHARED_DIR" in " ".join(refused.stderr.split())
    assert not (data / "keys").exists()  # no second key made beside the shared one

    result = runner.invoke(token_app, [*args, "--shared-dir", str(shared)])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[-1]
    assert TokenAuthority.from_data_dir(shared).verify(token).subject == "ci"
    listed = runner.invoke(token_app, ["list", "--data-dir", str(data)])
    assert listed.exit_code == 0 and "ci" in listed.stdout


def test_region_add_uses_the_shared_ca_and_prints_every_listener(tmp_path: Path) -> None:
    data, shared = _replica(tmp_path)
    fleet = pki.FleetPki.for_data_dir(shared)
    announce(shared, "https://cp-a:8443", fleet.fingerprint())
    announce(shared, "https://cp-b:8443", fleet.fingerprint())
    announce(shared, "https://cp-a:8443", fleet.fingerprint())  # A restarted: first again
    assert listener_urls(shared) == ["https://cp-a:8443", "https://cp-b:8443"]

    result = runner.invoke(
        region_app, ["add", "eu", "--data-dir", str(data), "--shared-dir", str(shared)]
    )
    assert result.exit_code == 0, result.output
    *_, command, token = result.stdout.strip().splitlines()
    assert command.startswith(
        f"shipyard agent --join https://cp-a:8443 --join https://cp-b:8443 --token {token}"
    )
    assert pki.JoinToken.parse(token).fingerprint == fleet.fingerprint()
    assert not (data / "fleet").exists()


def test_keys_export_reads_the_shared_key(tmp_path: Path) -> None:
    data, shared = _replica(tmp_path)
    assert runner.invoke(keys_app, ["export", "--data-dir", str(data)]).exit_code == 2
    result = runner.invoke(
        keys_app, ["export", "--data-dir", str(data), "--shared-dir", str(shared)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == signing.Ed25519Signer.load(shared).public_key_pem()


def test_serve_refuses_a_region_without_a_local_agent(tmp_path: Path) -> None:
    result = runner.invoke(
        cli,
        [
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--listen",
            "127.0.0.1:0",
            "--no-local-agent",
            "--region",
            "eu",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "--region names the local agent's regions" in " ".join(result.output.split())
    assert not (tmp_path / "data").exists(), "nothing was started"


def test_serve_refuses_a_shared_dir_inside_the_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = runner.invoke(
        cli,
        [
            "serve",
            "--data-dir",
            str(data),
            "--listen",
            "127.0.0.1:0",
            "--shared-dir",
            str(data / "shared"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "must not contain each other" in " ".join(result.output.split())
    assert not data.exists(), "nothing was started"
