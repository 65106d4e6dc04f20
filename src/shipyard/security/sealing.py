"""Values encrypted at rest with a key that is not in the database: app secrets
(``shipyard secret set``, ``store/secrets.py``) and notification sinks' signing keys and Slack
URLs (``notify/``).

AES-256-GCM (``cryptography``). The key is 32 random bytes in ``<shared_dir>/keys/secrets.key``
(mode 0600, created on first use by whoever needs it first: ``shipyard serve``, or the CLI on the
server's directory), so a copy of the database alone reveals nothing, and every control-plane
replica that shares the directory reads the same key (issue 14's shared key directory). Each
value is sealed with *associated data* naming what it is (``secret/hello/DB_PASSWORD/3``), so a
sealed value copied onto another row does not open there.
"""

from __future__ import annotations

import secrets as random
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shipyard.errors import ShipyardError
from shipyard.private_files import create_private, ensure_private_dir

KEY_NAME = "secrets.key"
_VERSION = b"v1"
_NONCE = 12


class SealingError(ShipyardError):
    """A sealed value does not open with this key (another key, a changed value or row)."""

    code = "sealed_value_unreadable"


def key_path(shared_dir: Path) -> Path:
    return shared_dir / "keys" / KEY_NAME


class Sealer:
    """Seals and opens values with one key; ``for_dir`` reads (or creates) the key file."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a sealing key is 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def for_dir(cls, shared_dir: Path) -> Sealer:
        """The key of ``<shared_dir>/keys/secrets.key``, created (0600, ``private_files``) when
        there is none; two processes creating it at once agree on one key."""
        path = key_path(shared_dir)
        ensure_private_dir(path.parent)
        create_private(path, random.token_bytes(32))
        return cls(path.read_bytes())

    def seal(self, value: bytes, about: str) -> bytes:
        """``value`` encrypted, bound to ``about`` (what it is; needed again to open it)."""
        nonce = random.token_bytes(_NONCE)
        return _VERSION + nonce + self._aead.encrypt(nonce, value, about.encode())

    def open(self, sealed: bytes, about: str) -> bytes:
        """The value ``seal(value, about)`` sealed; ``SealingError`` otherwise."""
        if not sealed.startswith(_VERSION) or len(sealed) < len(_VERSION) + _NONCE + 16:
            raise SealingError(f"sealed value for {about} is not in a format this Shipyard reads")
        nonce = sealed[len(_VERSION) : len(_VERSION) + _NONCE]
        try:
            return self._aead.decrypt(nonce, sealed[len(_VERSION) + _NONCE :], about.encode())
        except InvalidTag as exc:
            raise SealingError(
                f"sealed value for {about} does not open with {KEY_NAME}: the key file was "
                "replaced, or the stored value was changed or moved"
            ) from exc
