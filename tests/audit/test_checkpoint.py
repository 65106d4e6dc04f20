"""audit/checkpoint.py: C2SP signed notes and tlog checkpoints, against the spec's own example."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shipyard.audit.checkpoint import (
    Checkpoint,
    CheckpointInvalid,
    CheckpointKeyError,
    CheckpointSigner,
    NoteVerifier,
    load_verifier,
)

#: The example of c2sp.org/signed-note ("Verifier keys"): a vkey and a note it verifies.
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = (
    "This is an example message.\n"
    "\n"
    "\u2014 example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3m"
    "FXmRKuwHjG1Yu72IneyaQM=\n"
)
ROOT = hashlib.sha256(b"a root").digest()


@pytest.fixture
def signer() -> CheckpointSigner:
    return CheckpointSigner(Ed25519PrivateKey.generate())


def test_the_signed_note_spec_example_verifies() -> None:
    verifier = NoteVerifier.from_vkey(SPEC_VKEY)

    assert verifier.verified_text(SPEC_NOTE) == "This is an example message.\n"
    assert verifier.vkey() == SPEC_VKEY
    forged = SPEC_NOTE.replace("an example", "a forged")
    with pytest.raises(CheckpointInvalid, match="does not verify"):
        verifier.verified_text(forged)


def test_a_checkpoint_has_the_tlog_checkpoint_layout(signer: CheckpointSigner) -> None:
    note = signer.sign(42, ROOT)

    text, _, sig_line = note.partition("\n\n")
    assert text.split("\n") == [signer.name, "42", base64.b64encode(ROOT).decode()]
    assert sig_line.startswith(f"\u2014 {signer.name} ") and sig_line.endswith("\n")
    blob = base64.b64decode(sig_line.split(" ")[2])
    raw = signer.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    # key ID = SHA-256(name || 0x0A || 0x01 || public key)[:4], then the Ed25519 signature
    assert blob[:4] == hashlib.sha256(signer.name.encode() + b"\n\x01" + raw).digest()[:4]
    signer.public_key.verify(blob[4:], (text + "\n").encode())
    assert signer.name.startswith("shipyard.local/") and signer.name.endswith("/audit")
    assert signer.open(note) == Checkpoint(signer.name, 42, ROOT)


def test_unknown_signatures_are_ignored_and_a_bad_known_one_rejects(
    signer: CheckpointSigner,
) -> None:
    other = CheckpointSigner(Ed25519PrivateKey.generate())
    note = signer.sign(3, ROOT)
    cosigned = note + other.sign(3, ROOT).split("\n\n")[1]

    assert signer.open(cosigned).size == 3
    with pytest.raises(CheckpointInvalid, match="not signed by the key"):
        other.open(note)
    with pytest.raises(CheckpointInvalid, match="does not verify"):
        signer.open(note.replace("\n3\n", "\n4\n"))


@pytest.mark.parametrize(
    ("note", "message"),
    [
        ("no blank line\n", "not a signed note"),
        ("a\n1\nAAAA\n\n- name c2ln\n", "malformed signature line"),
        ("a\n1\nAAAA\n\n\u2014 name !!!\n", "not base64"),
        ("a\r\n1\n\n\u2014 name AAAAAAAA\n", "control characters"),
        ("x" * 70000, "at most 64 KiB"),
    ],
    ids=["no-signatures", "hyphen-not-em-dash", "signature-not-base64", "crlf", "huge"],
)
def test_malformed_notes_say_what_is_wrong(
    signer: CheckpointSigner, note: str, message: str
) -> None:
    with pytest.raises(CheckpointInvalid, match=message):
        signer.open(note)


def test_the_key_is_private_and_stable_and_its_vkey_verifies(tmp_path: Path) -> None:
    first = CheckpointSigner.load_or_create(tmp_path)
    again = CheckpointSigner.load_or_create(tmp_path)
    key_path = tmp_path / "keys" / "checkpoint.key"

    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert again.vkey() == first.vkey()
    vkey_file = tmp_path / "keys" / "checkpoint.vkey"
    assert vkey_file.read_text().strip() == first.vkey()
    assert load_verifier(vkey_file).open(first.sign(1, ROOT)).size == 1
    pem = tmp_path / "checkpoint.pem"
    pem.write_bytes(
        first.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert load_verifier(pem).open(first.sign(2, ROOT)).size == 2


def test_a_key_others_can_read_is_refused(tmp_path: Path) -> None:
    CheckpointSigner.load_or_create(tmp_path)
    os.chmod(tmp_path / "keys" / "checkpoint.key", 0o644)

    with pytest.raises(CheckpointKeyError, match="chmod 600"):
        CheckpointSigner.load(tmp_path)


def test_a_missing_key_is_not_created_by_load(tmp_path: Path) -> None:
    with pytest.raises(CheckpointKeyError, match="no checkpoint key"):
        CheckpointSigner.load(tmp_path)
    assert not (tmp_path / "keys").exists()


@pytest.mark.parametrize(
    ("vkey", "message"),
    [
        ("just-a-name", "a verifier key is"),
        ("example.com/foo+530d903b+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k", "key ID"),
        ("example.com/foo+530d903a+AkyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k", "base64"),
    ],
    ids=["no-parts", "wrong-key-id", "bad-base64"],
)
def test_bad_verifier_keys_are_refused(vkey: str, message: str) -> None:
    with pytest.raises(CheckpointKeyError, match=message):
        NoteVerifier.from_vkey(vkey)
