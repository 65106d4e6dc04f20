"""Ed25519 keys on disk, the in-toto/SLSA statement, DSSE envelopes, and every way verification
must refuse: unsigned, tampered, foreign key, digest mismatch, malformed."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import stat
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

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


# --- key ids --------------------------------------------------------------------------------------

#: RFC 8032 section 7.1, test 1: a fixed key, so the expected ids below are computed from
#: published bytes, not from the code under test.
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"


def test_keyid_is_securesystemslibs_default_for_a_published_key() -> None:
    key = Ed25519PrivateKey.from_private_bytes(RFC8032_SECRET).public_key()
    # securesystemslib's compute_default_keyid: sha256 over the canonical JSON written out here
    # by hand (sorted keys, no whitespace).
    canonical = (
        '{"keytype":"ed25519","keyval":{"public":"' + RFC8032_PUBLIC + '"},"scheme":"ed25519"}'
    ).encode()
    assert signing.keyid_for(key) == hashlib.sha256(canonical).hexdigest()
    assert (
        signing.legacy_keyid_for(key) == hashlib.sha256(bytes.fromhex(RFC8032_PUBLIC)).hexdigest()
    )
    assert signing.export_key(key) == {
        "keyid": hashlib.sha256(canonical).hexdigest(),
        "keytype": "ed25519",
        "scheme": "ed25519",
        "keyval": {"public": RFC8032_PUBLIC},
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param({"b": 1, "a": [True, None]}, b'{"a":[true,null],"b":1}', id="sorted-compact"),
        pytest.param('say "hi" \\ ok', b'"say \\"hi\\" \\\\ ok"', id="only-quote-and-backslash"),
        pytest.param("tab\there\n", b'"tab\there\n"', id="control-chars-raw"),
        pytest.param("é", '"é"'.encode(), id="utf8-not-escaped"),
    ],
)
def test_canonical_json_is_olpc(value: Any, expected: bytes) -> None:
    assert signing.canonical_json(value) == expected


def test_canonical_json_refuses_floats() -> None:
    with pytest.raises(TypeError, match="float"):
        signing.canonical_json({"a": 1.5})


def test_envelopes_carry_the_standard_keyid() -> None:
    env = signing.sign_statement(SIGNER, statement())
    assert env["signatures"][0]["keyid"] == signing.keyid_for(SIGNER.public_key)
    assert env["signatures"][0]["keyid"] != signing.legacy_keyid_for(SIGNER.public_key)


def _legacy_envelope(key: Ed25519PrivateKey, keyid_of: Ed25519PrivateKey) -> dict[str, Any]:
    """An envelope as Shipyard wrote it before the standard key id (signatures[].keyid =
    sha256 of the raw public key of ``keyid_of``), signed by ``key``, made without Shipyard's
    signer."""
    payload = json.dumps(statement(), sort_keys=True, separators=(",", ":")).encode()
    pae = b"DSSEv1 28 application/vnd.in-toto+json %d %b" % (len(payload), payload)
    raw = keyid_of.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return {
        "payloadType": "application/vnd.in-toto+json",
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {
                "keyid": hashlib.sha256(raw).hexdigest(),
                "sig": base64.b64encode(key.sign(pae)).decode(),
            }
        ],
    }


def test_envelope_signed_with_the_legacy_keyid_still_verifies(tmp_path: Path) -> None:
    # An artifact signed by an earlier Shipyard and stored in the data directory.
    signer = Ed25519Signer.load_or_create(tmp_path)
    private = serialization.load_pem_private_key(
        (tmp_path / "keys/signing.key").read_bytes(), password=None
    )
    assert isinstance(private, Ed25519PrivateKey)
    path = signing.write_envelope(_legacy_envelope(private, private), tmp_path / "old.dsse.json")
    assert signing.verify_file(path, DIGEST, signer.public_key) == statement()


def test_legacy_keyid_does_not_let_a_foreign_signature_through() -> None:
    foreign = Ed25519PrivateKey.generate()
    ours = Ed25519PrivateKey.generate()
    env = _legacy_envelope(foreign, keyid_of=ours)  # claims our legacy id, signed by another key
    with pytest.raises(ArtifactVerificationFailed, match="does not verify") as info:
        signing.verify(env, DIGEST, ours.public_key())
    assert info.value.detail.get("reason") == "bad_signature"


# --- the source URI -------------------------------------------------------------------------------

#: RFC 3986 section 3.1 scheme, and the characters a URI may hold (section 2) outside %HH.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_URI_CHARS = re.compile(r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*")
SHA = "0123456789abcdef" * 2 + "01234567"


def assert_rfc3986(uri: str) -> None:
    scheme, colon, _ = uri.partition(":")
    assert colon and _SCHEME.fullmatch(scheme), f"{uri!r}: no valid scheme"
    assert _URI_CHARS.fullmatch(uri), f"{uri!r}: characters outside RFC 3986"


@pytest.mark.parametrize(
    "name", ["repo", "with space", "odd@name", "percent%41", "ünï"], ids=lambda n: f"dir-{n}"
)
def test_local_repository_uri_is_git_file(tmp_path: Path, name: str) -> None:
    repo = tmp_path / name
    repo.mkdir()
    for given in (str(repo), repo.as_uri()):
        uri = signing.source_uri(given, SHA)
        assert_rfc3986(uri)
        parts = urlsplit(uri)
        assert parts.scheme == "git+file"
        assert parts.netloc == ""
        path, at, commit = parts.path.rpartition("@")
        assert at and commit == SHA
        assert unquote(path) == str(repo.resolve())


def test_relative_local_path_becomes_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "svc").mkdir()
    monkeypatch.chdir(tmp_path)
    assert signing.source_uri("svc", SHA) == f"git+file://{tmp_path.resolve()}/svc@{SHA}"


@pytest.mark.parametrize(
    ("repository", "scheme", "netloc", "path"),
    [
        (
            "https://git.example.invalid/org/hello.git",
            "git+https",
            "git.example.invalid",
            "/org/hello.git",
        ),
        (
            "HTTPS://git.example.invalid/org/hello/",
            "git+https",
            "git.example.invalid",
            "/org/hello",
        ),
        (
            "ssh://git@git.example.invalid/org/hello.git",
            "git+ssh",
            "git@git.example.invalid",
            "/org/hello.git",
        ),
        (
            "git@git.example.invalid:org/hello.git",
            "git+ssh",
            "git@git.example.invalid",
            "/org/hello.git",
        ),
        ("git://git.example.invalid/hello.git", "git+git", "git.example.invalid", "/hello.git"),
    ],
)
def test_remote_repository_uri(repository: str, scheme: str, netloc: str, path: str) -> None:
    uri = signing.source_uri(repository, SHA)
    assert_rfc3986(uri)
    parts = urlsplit(uri)
    assert (parts.scheme, parts.netloc, parts.path) == (scheme, netloc, f"{path}@{SHA}")


def test_statement_from_the_gate_names_a_local_source_by_git_file_uri(tmp_path: Path) -> None:
    s = signing.provenance_statement(
        subject_name="hello",
        subject_digest=DIGEST,
        builder_id="urn:shipyard:builder:local",
        source_repository=str(tmp_path),
        commit=SHA,
        build_command=None,
        materials=[signing.Material(uri=signing.source_uri(str(tmp_path), SHA), name="source")],
    )
    (dep,) = s["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert dep["uri"] == f"git+file://{tmp_path.resolve()}@{SHA}"
    assert_rfc3986(dep["uri"])
