"""Ed25519 keys on disk, the in-toto/SLSA statement, DSSE envelopes, and every way verification
must refuse: unsigned, tampered, foreign key, digest mismatch, malformed."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shipyard.errors import ArtifactVerificationFailed
from shipyard.security import signing
from shipyard.security.fake import FakeSigner
from shipyard.security.signing import Ed25519Signer, SigningKeyError

DIGEST = "sha256:" + "12" * 32
OTHER = "sha256:" + "34" * 32


def statement(digest: str = DIGEST) -> dict[str, Any]:
    return signing.provenance_statement(
        subject_name="hello",
        subject_digest=digest,
        builder_id="urn:shipyard:builder:local",
        source_repository="https://git.example.invalid/hello.git",
        commit="c0ffee" * 6 + "c0ff",
        build_command="pip install -r requirements.txt -t deps",
        materials=[
            signing.Material(
                uri="git+https://git.example.invalid/hello.git", digest={"gitCommit": "c0ffee"}
            )
        ],
    )


def test_pae_matches_the_dsse_spec_example() -> None:
    assert signing.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert signing.pae("t", "é".encode()) == b"DSSEv1 1 t 2 \xc3\xa9"


def test_key_pair_is_created_once_with_private_permissions(tmp_path: Path) -> None:
    first = Ed25519Signer.load_or_create(tmp_path)
    key, pub = tmp_path / "keys/signing.key", tmp_path / "keys/signing.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert pub.read_text() == first.public_key_pem()
    assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    second = Ed25519Signer.load_or_create(tmp_path)
    assert second.keyid == first.keyid
    assert isinstance(signing.load_public_key(pub), Ed25519PublicKey)


def test_stale_public_key_file_is_rewritten(tmp_path: Path) -> None:
    signer = Ed25519Signer.load_or_create(tmp_path)
    (tmp_path / "keys/signing.pub").write_text(Ed25519Signer.generate().public_key_pem())
    Ed25519Signer.load_or_create(tmp_path)
    assert (tmp_path / "keys/signing.pub").read_text() == signer.public_key_pem()


def test_group_readable_key_is_refused(tmp_path: Path) -> None:
    Ed25519Signer.load_or_create(tmp_path)
    (tmp_path / "keys/signing.key").chmod(0o644)
    with pytest.raises(SigningKeyError, match="chmod 600"):
        Ed25519Signer.load_or_create(tmp_path)


def test_statement_shape() -> None:
    s = statement()
    assert s["_type"] == "https://in-toto.io/Statement/v1"
    assert s["subject"] == [{"name": "hello", "digest": {"sha256": "12" * 32}}]
    assert s["predicateType"] == "https://slsa.dev/provenance/v1"
    build = s["predicate"]["buildDefinition"]
    assert build["buildType"] == signing.BUILD_TYPE
    assert build["externalParameters"]["source"] == {
        "repository": "https://git.example.invalid/hello.git",
        "commit": "c0ffee" * 6 + "c0ff",
    }
    assert build["externalParameters"]["buildCommand"] == "pip install -r requirements.txt -t deps"
    assert build["resolvedDependencies"] == [
        {"uri": "git+https://git.example.invalid/hello.git", "digest": {"gitCommit": "c0ffee"}}
    ]
    assert s["predicate"]["runDetails"]["builder"] == {"id": "urn:shipyard:builder:local"}


def test_envelope_is_dsse_and_verifies_independently() -> None:
    signer = Ed25519Signer.generate()
    env = signing.sign_statement(signer, statement())
    assert env["payloadType"] == "application/vnd.in-toto+json"
    assert env["signatures"][0]["keyid"] == signer.keyid
    payload = base64.b64decode(env["payload"])
    assert json.loads(payload) == statement()
    # Check with cryptography directly, over the PAE written out by hand.
    message = (
        b"DSSEv1 28 application/vnd.in-toto+json " + str(len(payload)).encode() + b" " + payload
    )
    signer.public_key.verify(base64.b64decode(env["signatures"][0]["sig"]), message)
    assert signing.verify(env, DIGEST, signer.public_key_pem()) == statement()


def tamper(env: dict[str, Any]) -> dict[str, Any]:
    body = json.loads(base64.b64decode(env["payload"]))
    body["subject"][0]["digest"]["sha256"] = "34" * 32  # claim another artifact
    return {**env, "payload": base64.b64encode(json.dumps(body).encode()).decode()}


SIGNER = Ed25519Signer.generate()
FOREIGN = Ed25519Signer.generate()


def _foreign_claiming_our_keyid(env: dict[str, Any]) -> dict[str, Any]:
    sig = FOREIGN.sign_envelope(env["payloadType"], base64.b64decode(env["payload"]))["signatures"][
        0
    ]
    return {**env, "signatures": [{**sig, "keyid": SIGNER.keyid}]}


@pytest.mark.parametrize(
    ("mutate", "digest", "reason", "message"),
    [
        pytest.param(
            lambda e: None,
            DIGEST,
            "unsigned",
            "is unsigned: no provenance envelope",
            id="missing-envelope",
        ),
        pytest.param(
            lambda e: {**e, "signatures": []},
            DIGEST,
            "unsigned",
            "carries no signatures",
            id="no-signatures",
        ),
        pytest.param(
            tamper, OTHER, "bad_signature", "payload was tampered with", id="tampered-payload"
        ),
        pytest.param(
            lambda e: signing.sign_statement(FOREIGN, statement()),
            DIGEST,
            "foreign_key",
            "signed by a foreign key",
            id="foreign-key",
        ),
        pytest.param(
            _foreign_claiming_our_keyid,
            DIGEST,
            "bad_signature",
            "does not verify",
            id="foreign-key-forged-keyid",
        ),
        pytest.param(lambda e: e, OTHER, "digest_mismatch", "digest mismatch", id="other-artifact"),
        pytest.param(
            lambda e: {**e, "payloadType": "text/plain"},
            DIGEST,
            "malformed",
            "payloadType",
            id="wrong-payload-type",
        ),
    ],
)
def test_verify_refuses(mutate: Any, digest: str, reason: str, message: str) -> None:
    env = mutate(signing.sign_statement(SIGNER, statement()))
    with pytest.raises(ArtifactVerificationFailed, match=message) as info:
        signing.verify(env, digest, SIGNER.public_key_pem())
    assert info.value.detail.get("reason") == reason


def test_verify_refuses_non_base64_payload() -> None:
    env = {**signing.sign_statement(SIGNER, statement()), "payload": "!!!"}
    with pytest.raises(ArtifactVerificationFailed, match="payload is not base64"):
        signing.verify(env, DIGEST, SIGNER.public_key)


def test_verify_file_round_trip_and_missing(tmp_path: Path) -> None:
    path = signing.write_envelope(
        signing.sign_statement(SIGNER, statement()), tmp_path / "env.json"
    )
    assert signing.verify_file(path, DIGEST, SIGNER.public_key)["subject"][0]["name"] == "hello"
    with pytest.raises(ArtifactVerificationFailed, match="unsigned"):
        signing.verify_file(tmp_path / "absent.json", DIGEST, SIGNER.public_key)


def test_fake_signer_keeps_the_contract() -> None:
    fake = FakeSigner()
    env = signing.sign_statement(fake, statement())
    assert signing.verify(env, DIGEST, fake.public_key_pem())["_type"] == signing.STATEMENT_TYPE
    assert len(fake.signed) == 1
