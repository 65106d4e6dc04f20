"""Signed provenance: an in-toto Statement v1 with a SLSA provenance v1 predicate, signed with
Ed25519 in a DSSE envelope, and the check that runs before every deploy.

* Keys: ``Ed25519Signer.load_or_create(data_dir)`` keeps ``<data_dir>/keys/signing.key``
  (PKCS#8 PEM, mode 0600, refused if group/other can read it) and ``signing.pub`` (PEM).
* Key id: the one securesystemslib (in-toto, python-tuf) computes for an Ed25519 key, so its DSSE
  ``Envelope.verify`` matches our signatures to the exported key with no extra argument: SHA-256,
  hex, of the OLPC canonical JSON of ``{"keytype": "ed25519", "scheme": "ed25519", "keyval":
  {"public": "<raw key, hex>"}}`` (``compute_default_keyid`` in securesystemslib >= 0.26; older
  releases also hashed a ``keyid_hash_algorithms`` list, which its signer API dropped). Envelopes
  signed before this change carry the *legacy* id, SHA-256 of the raw key bytes; ``verify``
  accepts both for the same key, so artifacts already stored in a data directory still deploy.
  ``export_key`` is the key as securesystemslib's ``Key.to_dict()`` writes it, plus ``keyid``.
* Envelope: ``{"payloadType": "application/vnd.in-toto+json", "payload": b64(statement),
  "signatures": [{"keyid", "sig"}]}``; the signature covers the DSSE v1 pre-authentication
  encoding ``PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body``.
* ``verify`` raises ``ArtifactVerificationFailed`` saying which of these it is: no envelope,
  malformed envelope, signed by a foreign key, bad signature (payload tampered), or a statement
  about another digest than the artifact about to be deployed.

Called by the gate (sign after a passing scan, verify before deploy), the API (``GET
/api/v1/keys``) and the CLI (``shipyard keys export``). ``Signer`` is the plug-point;
``fake.FakeSigner`` keeps the contract for tests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shipyard.errors import ArtifactVerificationFailed, InvalidInput
from shipyard.private_files import create_private

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PROVENANCE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:shipyard:buildtype:artifact:v1"
KEY_FILE = "signing.key"
KEY_TYPE = "ed25519"
KEY_SCHEME = "ed25519"
PUB_FILE = "signing.pub"


class SigningKeyError(InvalidInput):
    """The signing key on disk is unusable (unreadable, wrong type, too permissive)."""

    code = "signing_key_error"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding (lengths are byte counts in ASCII decimal)."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


def canonical_json(value: Any) -> bytes:
    """OLPC canonical JSON (what securesystemslib's ``encode_canonical`` writes): keys sorted,
    no whitespace, only ``"`` and ``\\`` escaped in strings, integers only (no floats)."""
    return _canonical(value).encode("utf-8")


def _canonical(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ",".join(_canonical(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("canonical JSON object keys must be strings")
        return (
            "{" + ",".join(f"{_canonical(k)}:{_canonical(value[k])}" for k in sorted(value)) + "}"
        )
    raise TypeError(f"canonical JSON cannot encode {type(value).__name__}")


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_dict(public_key: Ed25519PublicKey) -> dict[str, Any]:
    """The public key as securesystemslib serializes it (``SSlibKey.to_dict()``)."""
    return {"keytype": KEY_TYPE, "scheme": KEY_SCHEME, "keyval": {"public": _raw(public_key).hex()}}


def keyid_for(public_key: Ed25519PublicKey) -> str:
    """The standard key id (securesystemslib's default): sha256(canonical JSON of key_dict)."""
    return hashlib.sha256(canonical_json(key_dict(public_key))).hexdigest()


def legacy_keyid_for(public_key: Ed25519PublicKey) -> str:
    """The key id Shipyard wrote before it used the standard one: sha256 of the raw key."""
    return hashlib.sha256(_raw(public_key)).hexdigest()


def export_key(public_key: Ed25519PublicKey) -> dict[str, Any]:
    """``key_dict`` plus its ``keyid``: what ``shipyard keys export --format json`` prints and
    ``GET /api/v1/keys`` lists. securesystemslib reads it as
    ``Key.from_dict(d.pop("keyid"), d)``."""
    return {"keyid": keyid_for(public_key), **key_dict(public_key)}


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key(source: Ed25519PublicKey | bytes | str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object, PEM bytes/text, or a PEM file."""
    if isinstance(source, Ed25519PublicKey):
        return source
    if isinstance(source, Path):
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"cannot read public key {source}: {exc.strerror}") from exc
    else:
        data = source.encode("ascii") if isinstance(source, str) else source
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SigningKeyError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"public key is {type(key).__name__}, expected Ed25519")
    return key


# --- the statement --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Material:
    """A SLSA ResourceDescriptor: something the build consumed (or produced, as a byproduct)."""

    uri: str | None = None
    digest: Mapping[str, str] = field(default_factory=dict)
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        if self.uri:
            out["uri"] = self.uri
        if self.digest:
            out["digest"] = dict(self.digest)
        return out


def _hex(digest: str) -> str:
    algorithm, sep, value = digest.partition(":")
    if algorithm != "sha256" or not sep or len(value) != 64:
        raise InvalidInput(f"artifact digest must be sha256:<64 hex digits>, got {digest!r}")
    try:
        bytes.fromhex(value)
    except ValueError as exc:
        raise InvalidInput(f"artifact digest {digest!r} is not hex") from exc
    return value.lower()


def source_uri(repository: str, commit: str) -> str:
    """The SLSA ResourceDescriptor ``uri`` of a git source at ``commit`` (SPDX's VCS form):
    ``git+https://host/repo@sha``, ``git+ssh://user@host/repo@sha``, and for a local repository
    (a path or a ``file://`` URL) ``git+file:///abs/path@sha``, percent-encoded, so the URI is
    valid RFC 3986 and passes the SLSA schema. A relative path resolves against this process's
    working directory, as the build resolved it (``build.source.normalize_repository``)."""
    repo = repository.strip()
    if "://" in repo:
        parts = urlsplit(repo)
        scheme = parts.scheme.lower()
        if scheme == "file":
            url = Path(unquote(parts.path)).expanduser().resolve().as_uri()
        else:
            url = parts._replace(scheme=scheme).geturl().rstrip("/")
        if scheme.startswith("git+"):
            return f"{url}@{commit}"
        return f"git+{url}@{commit}"
    scp = _SCP_LIKE.match(repo)
    if scp and not repo.startswith(".") and not Path(repo).expanduser().exists():
        path = scp["path"] if scp["path"].startswith("/") else "/" + scp["path"]
        return f"git+ssh://{scp['user'] or ''}{scp['host']}{quote(path)}@{commit}"
    return f"git+{Path(repo).expanduser().resolve().as_uri()}@{commit}"


#: ``user@host:path``, git's scp-like ssh syntax (no slash before the colon).
_SCP_LIKE = re.compile(r"^(?P<user>[A-Za-z0-9._~-]+@)?(?P<host>[A-Za-z0-9.-]+):(?!//)(?P<path>.*)$")


def provenance_statement(
    *,
    subject_name: str,
    subject_digest: str,
    builder_id: str,
    source_repository: str | None,
    commit: str,
    build_command: str | None,
    materials: Sequence[Material] = (),
    byproducts: Sequence[Material] = (),
    build_type: str = BUILD_TYPE,
    internal_parameters: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An in-toto Statement v1 whose predicate is SLSA provenance v1."""
    source: dict[str, Any] = {"commit": commit}
    if source_repository:
        source["repository"] = source_repository
    build_definition: dict[str, Any] = {
        "buildType": build_type,
        "externalParameters": {"source": source, "buildCommand": build_command},
        "resolvedDependencies": [m.to_dict() for m in materials],
    }
    if internal_parameters:
        build_definition["internalParameters"] = dict(internal_parameters)
    run_details: dict[str, Any] = {"builder": {"id": builder_id}}
    if metadata:
        run_details["metadata"] = dict(metadata)
    if byproducts:
        run_details["byproducts"] = [m.to_dict() for m in byproducts]
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": _hex(subject_digest)}}],
        "predicateType": PROVENANCE_TYPE,
        "predicate": {"buildDefinition": build_definition, "runDetails": run_details},
    }


def statement_bytes(statement: Mapping[str, Any]) -> bytes:
    return json.dumps(statement, sort_keys=True, separators=(",", ":")).encode("utf-8")


# --- signing --------------------------------------------------------------------------------------


class Signer(Protocol):
    @property
    def keyid(self) -> str: ...

    def public_key_pem(self) -> str: ...

    def sign_envelope(self, payload_type: str, payload: bytes) -> dict[str, Any]: ...


class Ed25519Signer:
    """Signs DSSE envelopes with an Ed25519 key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self._keyid = keyid_for(self.public_key)

    @property
    def keyid(self) -> str:
        return self._keyid

    def public_key_pem(self) -> str:
        return public_key_pem(self.public_key)

    def sign_envelope(self, payload_type: str, payload: bytes) -> dict[str, Any]:
        sig = self._key.sign(pae(payload_type, payload))
        return {
            "payloadType": payload_type,
            "payload": base64.b64encode(payload).decode("ascii"),
            "signatures": [{"keyid": self.keyid, "sig": base64.b64encode(sig).decode("ascii")}],
        }

    @classmethod
    def generate(cls) -> Ed25519Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, data_dir: Path) -> Ed25519Signer:
        """The server's existing key from ``<data_dir>/keys``; SigningKeyError when there is none
        (``shipyard keys export`` never makes a key in a directory it was merely pointed at)."""
        key_path = data_dir / "keys" / KEY_FILE
        if not key_path.exists():
            raise SigningKeyError(
                f"no signing key at {key_path}: the server makes it when it first signs an "
                "artifact; check --data-dir, or deploy once first"
            )
        return cls(_load_private(key_path))

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Ed25519Signer:
        """The server's key from ``<data_dir>/keys``, generated on first use."""
        keys = data_dir / "keys"
        key_path, pub_path = keys / KEY_FILE, keys / PUB_FILE
        keys.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not key_path.exists():
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            # Another process may be first: then its key is the one both of us use.
            create_private(key_path, pem)
        signer = cls(_load_private(key_path))
        pem_pub = signer.public_key_pem()
        try:
            current = pub_path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            current = ""
        if current != pem_pub:  # missing or stale: the public half is derived, rewrite it
            tmp = pub_path.with_name(f".{PUB_FILE}.tmp{os.getpid()}")
            tmp.write_text(pem_pub, encoding="ascii")
            os.replace(tmp, pub_path)
        return signer


def _load_private(path: Path) -> Ed25519PrivateKey:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise SigningKeyError(
                f"signing key {path} is accessible by group/others (mode {mode:o}); "
                f"run: chmod 600 {path}"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read signing key {path}: {exc.strerror or exc}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"signing key {path} is not an unencrypted PEM key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"signing key {path} is {type(key).__name__}, expected Ed25519")
    return key


def sign_statement(signer: Signer, statement: Mapping[str, Any]) -> dict[str, Any]:
    return signer.sign_envelope(PAYLOAD_TYPE, statement_bytes(statement))


def write_envelope(envelope: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(envelope, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# --- verifying ------------------------------------------------------------------------------------


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ArtifactVerificationFailed(f"malformed DSSE envelope: {what} is not a string")
    try:
        # DSSE accepts standard and URL-safe base64, padded or not.
        text = value.replace("-", "+").replace("_", "/")
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ArtifactVerificationFailed(f"malformed DSSE envelope: {what} is not base64") from exc


def verify(
    envelope: Mapping[str, Any] | None,
    expected_digest: str,
    public_key: Ed25519PublicKey | bytes | str | Path,
) -> dict[str, Any]:
    """Check that ``envelope`` is this server's signature over provenance for exactly
    ``expected_digest``; returns the verified statement, else ArtifactVerificationFailed."""
    key = load_public_key(public_key)
    ours = keyid_for(key)
    # Envelopes stored before the standard key id carry the legacy one: same key, still ours.
    accepted = {ours, legacy_keyid_for(key)}
    want = _hex(expected_digest)
    if envelope is None:
        raise ArtifactVerificationFailed(
            f"artifact {expected_digest} is unsigned: no provenance envelope. Only artifacts "
            "built, scanned and signed by the pipeline can be deployed; run it through the "
            "security gate first.",
            digest=expected_digest,
            reason="unsigned",
        )
    if not isinstance(envelope, Mapping):
        raise ArtifactVerificationFailed(
            "malformed DSSE envelope: not a JSON object", reason="malformed"
        )
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise ArtifactVerificationFailed(
            f"malformed DSSE envelope: payloadType is {envelope.get('payloadType')!r}, "
            f"expected {PAYLOAD_TYPE!r}",
            reason="malformed",
        )
    payload = _b64(envelope.get("payload"), "payload")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise ArtifactVerificationFailed(
            f"artifact {expected_digest} is unsigned: the envelope carries no signatures",
            digest=expected_digest,
            reason="unsigned",
        )
    message = pae(PAYLOAD_TYPE, payload)
    foreign: list[str] = []
    bad_ours = False
    verified = False
    for i, sig in enumerate(signatures):
        if not isinstance(sig, Mapping):
            raise ArtifactVerificationFailed(
                f"malformed DSSE envelope: signatures[{i}] is not an object"
            )
        keyid = sig.get("keyid") or ""
        if keyid and keyid not in accepted:
            foreign.append(str(keyid))
            continue
        try:
            key.verify(_b64(sig.get("sig"), f"signatures[{i}].sig"), message)
        except InvalidSignature:
            bad_ours = True
            continue
        verified = True
        break
    if not verified:
        if bad_ours:
            raise ArtifactVerificationFailed(
                f"bad signature on the provenance of {expected_digest}: it does not verify with "
                f"this server's key (keyid {ours[:16]}); the payload was tampered with or the "
                "signature is corrupt. Do not deploy; rebuild through the pipeline.",
                digest=expected_digest,
                reason="bad_signature",
            )
        raise ArtifactVerificationFailed(
            f"provenance of {expected_digest} is signed by a foreign key "
            f"(keyid {', '.join(k[:16] for k in foreign)}), not this server's signing key "
            f"(keyid {ours[:16]}).",
            digest=expected_digest,
            reason="foreign_key",
            keyids=foreign,
        )
    try:
        statement = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactVerificationFailed(
            f"signed payload is not JSON: {exc}", reason="malformed"
        ) from exc
    kind = statement.get("_type") if isinstance(statement, dict) else None
    if not isinstance(statement, dict) or kind != STATEMENT_TYPE:
        raise ArtifactVerificationFailed(
            f"signed payload is not an in-toto Statement v1 (_type {kind!r})",
            reason="malformed",
        )
    if statement.get("predicateType") != PROVENANCE_TYPE:
        raise ArtifactVerificationFailed(
            f"signed statement's predicateType is {statement.get('predicateType')!r}, "
            f"expected {PROVENANCE_TYPE!r}",
            reason="malformed",
        )
    subjects = statement.get("subject")
    signed = [
        str(s["digest"].get("sha256", "")).lower()
        for s in (subjects if isinstance(subjects, list) else [])
        if isinstance(s, dict) and isinstance(s.get("digest"), dict)
    ]
    if want not in signed:
        raise ArtifactVerificationFailed(
            f"digest mismatch: the signed provenance is for "
            f"{', '.join('sha256:' + d for d in signed) or 'no digest'}, but the artifact to "
            f"deploy is {expected_digest}. Deploy only the exact digest that was built, scanned "
            "and signed.",
            digest=expected_digest,
            signed_digests=["sha256:" + d for d in signed],
            reason="digest_mismatch",
        )
    return statement


def read_envelope(path: Path) -> dict[str, Any] | None:
    """The envelope stored at ``path``; None when there is none (an unsigned artifact)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactVerificationFailed(f"cannot read provenance envelope {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactVerificationFailed(
            f"provenance envelope {path} is not JSON: {exc}", reason="malformed"
        ) from exc
    if not isinstance(data, dict):
        raise ArtifactVerificationFailed(
            f"provenance envelope {path} is not a JSON object", reason="malformed"
        )
    return data


def verify_file(
    path: Path, expected_digest: str, public_key: Ed25519PublicKey | bytes | str | Path
) -> dict[str, Any]:
    return verify(read_envelope(path), expected_digest, public_key)
