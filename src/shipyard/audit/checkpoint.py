"""Checkpoints: the audit tree's head as a C2SP ``tlog-checkpoint``, signed as a C2SP
``signed-note`` with an Ed25519 key of its own.

A checkpoint's note text is three lines, each ending in a newline::

    shipyard.local/<installation id>/audit      origin (also the key name)
    <tree size>                                 decimal, no leading zeros
    <base64 root hash>                          MTH of the first <tree size> records (merkle.py)

then a blank line and one signature line ``— <key name> base64(key ID || Ed25519 signature)``
where ``key ID = SHA-256(key name || 0x0A || 0x01 || 32-byte public key)[:4]`` and the signature
covers the note text. The installation id is the first 16 hex digits of SHA-256 of the public key:
stable for as long as the data directory keeps its key, and a new key is a new log.

The key is ``<data_dir>/keys/checkpoint.key`` (PKCS#8 PEM, 0600, created by
``private_files.create_private``); it is not the artifact signing key, so a checkpoint can never
be passed off as an attestation or the reverse. ``<data_dir>/keys/checkpoint.vkey`` holds the
verifier key in the C2SP form ``<name>+<hex key ID>+base64(0x01 || public key)``: give that (or
a copy kept elsewhere) to whoever verifies, e.g. ``shipyard audit verify --checkpoint-key``.

Called by the publisher (publishing.py: ``CheckpointSigner.sign``) and the CLI
(``NoteVerifier.open`` in ``audit verify --checkpoint`` / ``audit prove``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shipyard.audit import merkle
from shipyard.errors import InvalidInput
from shipyard.private_files import create_private, write_private

KEY_FILE = "checkpoint.key"
VKEY_FILE = "checkpoint.vkey"
ED25519_TYPE = b"\x01"
SIGNATURE_PREFIX = "\u2014 "  # em dash, space
#: A note larger than this is not one of ours (ours are ~250 bytes); refuse before parsing.
MAX_NOTE_BYTES = 64 * 1024
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


class CheckpointInvalid(InvalidInput):
    """A checkpoint that is malformed, or not signed by the key it is checked against."""

    code = "audit_checkpoint_invalid"


class CheckpointKeyError(InvalidInput):
    """The checkpoint key (private or verifier) is missing, unreadable or not Ed25519."""

    code = "audit_checkpoint_key_error"


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: ``size`` leaves whose MTH is ``root``, in the log named ``origin``."""

    origin: str
    size: int
    root: bytes

    def text(self) -> str:
        """The note text the signature covers (three lines, each newline-terminated)."""
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"


def key_id(name: str, public_key: Ed25519PublicKey) -> bytes:
    """The C2SP signed-note key ID of an Ed25519 key: 4 bytes."""
    return hashlib.sha256(name.encode() + b"\n" + ED25519_TYPE + _raw(public_key)).digest()[:4]


def origin_for(public_key: Ed25519PublicKey) -> str:
    """``shipyard.local/<installation id>/audit``: the log's origin and its key's name."""
    return f"shipyard.local/{hashlib.sha256(_raw(public_key)).hexdigest()[:16]}/audit"


class NoteVerifier:
    """Checks checkpoints signed by one key (name + Ed25519 public key)."""

    def __init__(self, name: str, public_key: Ed25519PublicKey) -> None:
        _check_name(name)
        self.name = name
        self.public_key = public_key
        self.key_id = key_id(name, public_key)

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Parse ``<name>+<hex key ID>+base64(0x01 || public key)``; CheckpointKeyError if it
        is not one, or its key ID does not match its key."""
        parts = vkey.strip().split("+", 2)  # base64 may hold "+"; name and hex never do
        if len(parts) != 3:
            raise CheckpointKeyError(
                "a verifier key is <name>+<hex key id>+<base64 key>, e.g. the content of "
                "<data_dir>/keys/checkpoint.vkey"
            )
        name, hex_id, b64_key = parts
        try:
            raw_id = bytes.fromhex(hex_id)
            material = base64.b64decode(b64_key, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise CheckpointKeyError(
                f"verifier key is not hex/base64 where it should be: {exc}"
            ) from exc
        if material[:1] != ED25519_TYPE or len(material) != 33:
            raise CheckpointKeyError("verifier key is not an Ed25519 (type 0x01) note key")
        try:
            verifier = cls(name, Ed25519PublicKey.from_public_bytes(material[1:]))
        except CheckpointInvalid as exc:
            raise CheckpointKeyError(f"verifier key name: {exc.message}") from exc
        if verifier.key_id != raw_id:
            raise CheckpointKeyError("verifier key's key ID does not match its name and key")
        return verifier

    def vkey(self) -> str:
        raw = base64.b64encode(ED25519_TYPE + _raw(self.public_key)).decode()
        return f"{self.name}+{self.key_id.hex()}+{raw}"

    def open(self, note: str | bytes) -> Checkpoint:
        """The checkpoint in ``note`` if this key signed it; CheckpointInvalid saying why not."""
        return _parse_body(self.verified_text(note), self.name)

    def verified_text(self, note: str | bytes) -> str:
        """The text of the signed note ``note`` if this key signed it; CheckpointInvalid if not.

        Per signed-note: the text ends at the last blank line; lines by other keys are ignored;
        a line by this key (name and key ID) that fails to verify rejects the whole note.
        """
        text, signatures = _split_note(note)
        verified = False
        for name, blob in signatures:
            if name != self.name or blob[:4] != self.key_id:
                continue
            try:
                self.public_key.verify(blob[4:], text.encode())
            except InvalidSignature:
                raise CheckpointInvalid(
                    f"the checkpoint's signature by {name} does not verify: its text was changed "
                    "after signing, or it was signed by another key under the same name"
                ) from None
            verified = True
        if not verified:
            names = ", ".join(sorted({n for n, _ in signatures}))
            raise CheckpointInvalid(
                f"the checkpoint is not signed by the key {self.name} ({self.key_id.hex()}); "
                f"its signatures are by: {names}"
            )
        return text


class CheckpointSigner(NoteVerifier):
    """Signs checkpoints of this log; the key name is the origin (``origin_for``)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        public = private_key.public_key()
        super().__init__(origin_for(public), public)
        self._private_key = private_key

    def sign(self, size: int, root: bytes) -> str:
        """The signed note for the tree head (``size``, ``root``)."""
        if size < 0 or len(root) != merkle.HASH_SIZE:
            raise InvalidInput(f"not a tree head: size {size}, {len(root)}-byte root")
        text = Checkpoint(self.name, size, root).text()
        blob = self.key_id + self._private_key.sign(text.encode())
        return f"{text}\n{SIGNATURE_PREFIX}{self.name} {base64.b64encode(blob).decode()}\n"

    @classmethod
    def load_or_create(cls, data_dir: Path) -> CheckpointSigner:
        """The key in ``<data_dir>/keys/checkpoint.key``, generated (0600) on first use; the
        verifier key beside it is rewritten when missing or stale."""
        keys = data_dir / "keys"
        keys.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = keys / KEY_FILE
        if not path.exists():
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            create_private(path, pem)  # a racing process may win: then its key is ours too
        signer = cls.load(data_dir)
        vkey_path = keys / VKEY_FILE
        try:
            current = vkey_path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            current = ""
        if current.strip() != signer.vkey():
            write_private(vkey_path, signer.vkey() + "\n")
        return signer

    @classmethod
    def load(cls, data_dir: Path) -> CheckpointSigner:
        """The existing key (never creates one); CheckpointKeyError if absent or unusable."""
        path = data_dir / "keys" / KEY_FILE
        try:
            mode = stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode)
            if mode & 0o077:
                raise CheckpointKeyError(
                    f"checkpoint key {path} is accessible by group/others (mode {mode:o}); "
                    f"run: chmod 600 {path}"
                )
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise CheckpointKeyError(
                f"no checkpoint key at {path}: it is made by `shipyard serve --witness ...`"
            ) from exc
        except OSError as exc:
            raise CheckpointKeyError(
                f"cannot read checkpoint key {path}: {exc.strerror or exc}"
            ) from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise CheckpointKeyError(f"checkpoint key {path} is not a PEM key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise CheckpointKeyError(f"checkpoint key {path} is {type(key).__name__}, not Ed25519")
        return cls(key)


def load_verifier(path: Path) -> NoteVerifier:
    """A verifier from a file holding a vkey (``checkpoint.vkey``), or a PEM public key (then
    the key name is derived from it, as the server derives it). Called by the CLI."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointKeyError(
            f"cannot read checkpoint key {path}: {exc.strerror or exc}"
        ) from exc
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise CheckpointKeyError(f"{path} is not a PEM public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise CheckpointKeyError(f"{path} holds a {type(key).__name__}, not Ed25519")
        return NoteVerifier(origin_for(key), key)
    try:
        return NoteVerifier.from_vkey(data.decode("ascii"))
    except UnicodeDecodeError as exc:
        raise CheckpointKeyError(f"{path} is neither a verifier key nor a PEM key") from exc


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise CheckpointInvalid(f"key name {name!r} is empty or holds a space or '+'")


def _split_note(note: str | bytes) -> tuple[str, list[tuple[str, bytes]]]:
    raw = note.encode() if isinstance(note, str) else note
    if len(raw) > MAX_NOTE_BYTES:
        raise CheckpointInvalid(f"the checkpoint is {len(raw)} bytes; a note is at most 64 KiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointInvalid("the checkpoint is not UTF-8 text") from exc
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise CheckpointInvalid("the checkpoint holds control characters (CRLF line ends?)")
    cut = text.rfind("\n\n")
    if cut < 0 or not text.endswith("\n"):
        raise CheckpointInvalid(
            "not a signed note: expected the text, a blank line, then signature lines"
        )
    body, sig_lines = text[: cut + 1], text[cut + 2 : -1].split("\n")
    signatures: list[tuple[str, bytes]] = []
    for line in sig_lines:
        name, _, b64 = line.removeprefix(SIGNATURE_PREFIX).partition(" ")
        if not line.startswith(SIGNATURE_PREFIX) or not name or not b64 or " " in b64:
            raise CheckpointInvalid(f"malformed signature line {line[:80]!r}")
        try:
            blob = base64.b64decode(b64, validate=True)
        except binascii.Error as exc:
            raise CheckpointInvalid(f"signature of {name} is not base64") from exc
        if len(blob) < 5:
            raise CheckpointInvalid(f"signature of {name} is too short")
        signatures.append((name, blob))
    return body, signatures


def _parse_body(text: str, key_name: str) -> Checkpoint:
    lines = text[:-1].split("\n")
    if len(lines) < 3 or not all(lines):
        raise CheckpointInvalid("a checkpoint's text is origin, tree size and root hash lines")
    origin, size_text, root_text = lines[:3]
    if origin != key_name:
        raise CheckpointInvalid(f"checkpoint origin {origin!r} is not this log ({key_name})")
    if not _DECIMAL.fullmatch(size_text):
        raise CheckpointInvalid(f"checkpoint tree size {size_text!r} is not a decimal number")
    try:
        root = base64.b64decode(root_text, validate=True)
    except binascii.Error as exc:
        raise CheckpointInvalid("checkpoint root hash is not base64") from exc
    if len(root) != merkle.HASH_SIZE:
        raise CheckpointInvalid(f"checkpoint root hash is {len(root)} bytes, not 32")
    return Checkpoint(origin, int(size_text), root)
