"""Shipyard's attestations verified the way a third party would: the envelope file the gate wrote,
the key `shipyard keys export` printed, and someone else's code — securesystemslib's DSSE
``Envelope.verify``, or plain ``cryptography`` with the DSSE pre-authentication encoding written
out here. No Shipyard function sits in either verification path; a tampered envelope fails both."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import Key, SSlibKey
from typer.testing import CliRunner

from shipyard.build.base import Artifact
from shipyard.cli.keys import keys_app
from shipyard.domain.clock import FakeClock
from shipyard.domain.manifest import parse_manifest
from shipyard.security.gate import SecurityGate

from .conftest import artifact_tree

runner = CliRunner()
MANIFEST = parse_manifest('[service]\nname = "hello"\n[run]\ncommand = "python app.py"\n')
COMMIT = "c0ffee" * 6 + "c0ff"


@pytest.fixture
async def signed(tmp_path: Path) -> tuple[Path, Path, str]:
    """(data dir, envelope file, artifact digest): one artifact through the real gate, built
    from a local repository (so its provenance names a git+file URI)."""
    data_dir = tmp_path / "data"
    repo = tmp_path / "source repo"
    repo.mkdir()
    artifact_tree(tmp_path / "app", {"requests": "2.32.3"})
    digest = "sha256:" + hashlib.sha256(b"the artifact").hexdigest()
    artifact = Artifact(
        digest=digest,
        kind="directory",
        location=str(tmp_path / "app"),
        commit=COMMIT,
        manifest=MANIFEST,
        builder="local",
        duration_ms=1,
    )
    gate = SecurityGate(data_dir=data_dir, db_path=None, clock=FakeClock(1_750_000_000))
    report = await gate.check(artifact, tmp_path / "sboms", source_repository=str(repo))
    return data_dir, report.envelope_path, digest


def export(data_dir: Path, fmt: str) -> str:
    result = runner.invoke(keys_app, ["export", "--data-dir", str(data_dir), "--format", fmt])
    assert result.exit_code == 0, result.output
    return result.stdout


def tampered(envelope: dict[str, Any]) -> dict[str, Any]:
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["subject"][0]["digest"]["sha256"] = "00" * 32
    payload = base64.b64encode(json.dumps(statement).encode()).decode()
    return {**envelope, "payload": payload}


def test_securesystemslib_verifies_with_only_the_exported_key(
    signed: tuple[Path, Path, str],
) -> None:
    data_dir, envelope_path, digest = signed
    exported = json.loads(export(data_dir, "json"))
    key = Key.from_dict(exported.pop("keyid"), exported)
    envelope = json.loads(envelope_path.read_text())

    accepted = Envelope.from_dict(json.loads(envelope_path.read_text())).verify([key], 1)

    assert list(accepted) == [key.keyid]
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["subject"][0]["digest"] == {"sha256": digest.removeprefix("sha256:")}
    (source,) = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert source["uri"].startswith("git+file:///") and source["uri"].endswith(f"@{COMMIT}")
    with pytest.raises(VerificationError):
        Envelope.from_dict(tampered(envelope)).verify([key], 1)


def test_exported_keyid_is_the_one_securesystemslib_computes(
    signed: tuple[Path, Path, str],
) -> None:
    data_dir, envelope_path, _ = signed
    pem_key = load_pem_public_key(export(data_dir, "pem").encode())
    exported = json.loads(export(data_dir, "json"))
    assert isinstance(pem_key, Ed25519PublicKey)
    assert SSlibKey.from_crypto(pem_key).keyid == exported["keyid"]
    envelope = json.loads(envelope_path.read_text())
    assert [s["keyid"] for s in envelope["signatures"]] == [exported["keyid"]]


def test_cryptography_verifies_with_the_pem_and_a_hand_written_pae(
    signed: tuple[Path, Path, str],
) -> None:
    data_dir, envelope_path, _ = signed
    key = load_pem_public_key(export(data_dir, "pem").encode())
    assert isinstance(key, Ed25519PublicKey)
    envelope = json.loads(envelope_path.read_text())

    def check(env: dict[str, Any]) -> None:
        payload_type = env["payloadType"].encode()
        payload = base64.b64decode(env["payload"])
        pae = b"DSSEv1 %d %b %d %b" % (len(payload_type), payload_type, len(payload), payload)
        key.verify(base64.b64decode(env["signatures"][0]["sig"]), pae)

    check(envelope)
    with pytest.raises(InvalidSignature):
        check(tampered(envelope))


def test_export_without_a_key_says_so_and_makes_none(tmp_path: Path) -> None:
    result = runner.invoke(keys_app, ["export", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no signing key" in result.stderr
    assert not (tmp_path / "keys").exists()
