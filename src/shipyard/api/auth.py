"""Who may do what: JWT bearer tokens with permission claims, and the FastAPI dependency.

``shipyard serve`` puts ``TokenAuthority.from_data_dir(data_dir)`` on
``app.state.token_authority``; routes declare ``Depends(require_permission("deployment:create"))``;
``shipyard token create`` (cli/token.py) issues tokens with the same key. Failures raise
``Unauthenticated`` (401) or ``PermissionDenied`` (403); the API's error mapper answers them.

Tokens are HS256 only, signed with a 32-byte random key created on first use at
``<data_dir>/keys/jwt.key`` (mode 0600). The header's ``alg`` is checked before anything else, so
``none``, HS512 and RS256-headed tokens (algorithm confusion) are refused outright. Neither the key
nor a token ever appears in an error message or a log line.
"""

from __future__ import annotations

import datetime as dt
import secrets
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeGuard

import jwt
from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jwt.exceptions import InvalidSubjectError

from shipyard.errors import InvalidInput, PermissionDenied, Unauthenticated
from shipyard.private_files import create_private

PERMISSIONS: frozenset[str] = frozenset(
    {"deployment:create", "deployment:rollback", "deployment:read"}
)
ALGORITHM = "HS256"
KEY_BYTES = 32
KEY_RELATIVE_PATH = Path("keys") / "jwt.key"
_REQUIRED_CLAIMS = ("sub", "iat", "exp", "iss", "permissions")
_MAX_SUBJECT = 200


@dataclass(frozen=True)
class Claims:
    """A verified token: who, what they may do, and until when."""

    subject: str
    permissions: frozenset[str]
    expires_at: dt.datetime

    def has_permission(self, permission: str) -> bool:
        return permission in self.permissions

    def require(self, permission: str) -> None:
        """PermissionDenied unless this token carries ``permission``."""
        if permission not in self.permissions:
            raise PermissionDenied(
                f"token for {self.subject!r} lacks the {permission!r} permission; "
                f"issue one with `shipyard token create --permission {permission}`",
                required_permission=permission,
            )


def _unauthenticated(message: str, reason: str) -> Unauthenticated:
    return Unauthenticated(message, reason=reason)


class TokenAuthority:
    """Issues and verifies Shipyard's HS256 tokens with one shared key."""

    def __init__(
        self, key: bytes, issuer: str = "shipyard", *, clock: Callable[[], float] = time.time
    ) -> None:
        if not isinstance(key, bytes) or len(key) < KEY_BYTES:
            raise InvalidInput(f"the token signing key must be at least {KEY_BYTES} bytes")
        if not issuer:
            raise InvalidInput("the token issuer must not be empty")
        self._key = key
        self.issuer = issuer
        self._clock = clock

    def __repr__(self) -> str:  # never show the key
        return f"TokenAuthority(issuer={self.issuer!r})"

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> TokenAuthority:
        """The authority for ``data_dir``, creating its key on first use."""
        return cls(load_or_create_key(data_dir))

    def issue(self, subject: str, permissions: Sequence[str], ttl_seconds: int = 12 * 3600) -> str:
        """A signed token for ``subject`` with ``permissions``, valid for ``ttl_seconds``."""
        if (
            not isinstance(subject, str)
            or not subject
            or subject != subject.strip()
            or len(subject) > _MAX_SUBJECT
            or not subject.isprintable()
        ):
            raise InvalidInput(
                f"subject must be 1-{_MAX_SUBJECT} printable characters without surrounding "
                f"spaces, not {subject!r}"
            )
        if isinstance(permissions, str):
            raise InvalidInput("permissions must be a list of permission names, not one string")
        unknown = sorted(set(permissions) - PERMISSIONS)
        if unknown:
            raise InvalidInput(
                f"unknown permission(s) {', '.join(unknown)}; valid: "
                f"{', '.join(sorted(PERMISSIONS))}",
                unknown=unknown,
                valid=sorted(PERMISSIONS),
            )
        if not permissions:
            raise InvalidInput(
                f"a token needs at least one permission; valid: {', '.join(sorted(PERMISSIONS))}"
            )
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0:
            raise InvalidInput(f"ttl_seconds must be a positive integer, not {ttl_seconds!r}")
        now = int(self._clock())
        payload = {
            "sub": subject,
            "iat": now,
            "exp": now + ttl_seconds,
            "iss": self.issuer,
            "permissions": sorted(set(permissions)),
        }
        return jwt.encode(payload, self._key, algorithm=ALGORITHM)

    def verify(self, token: str) -> Claims:
        """The token's claims, or Unauthenticated saying why not (``detail["reason"]``)."""
        if not isinstance(token, str) or not token:
            raise _unauthenticated("no bearer token was presented", "missing")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _unauthenticated("the bearer token is malformed", "malformed") from exc
        if header.get("alg") != ALGORITHM:
            raise _unauthenticated(
                f"token algorithm {str(header.get('alg'))[:20]!r} is not accepted; only "
                f"{ALGORITHM}",
                "unsupported_algorithm",
            )
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                issuer=self.issuer,
                # Expiry is checked below against the injected clock.
                options={
                    "require": list(_REQUIRED_CLAIMS),
                    "verify_exp": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError as exc:
            raise _unauthenticated("the token signature is invalid", "invalid_signature") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise _unauthenticated(
                f"the token has no {exc.claim!r} claim", "missing_claim"
            ) from exc
        except jwt.InvalidIssuerError as exc:
            raise _unauthenticated(
                "the token was not issued by this Shipyard", "wrong_issuer"
            ) from exc
        except InvalidSubjectError as exc:
            raise _unauthenticated(
                "the token's 'sub' claim is not a name", "invalid_claim"
            ) from exc
        except jwt.DecodeError as exc:
            raise _unauthenticated("the bearer token is malformed", "malformed") from exc
        except jwt.PyJWTError as exc:
            raise _unauthenticated("the bearer token is invalid", "invalid") from exc
        return self._claims(payload)

    def _claims(self, payload: dict[str, Any]) -> Claims:
        sub, exp, iat, perms = (payload.get(k) for k in ("sub", "exp", "iat", "permissions"))
        if not isinstance(sub, str) or not sub:
            raise _unauthenticated("the token's 'sub' claim is not a name", "invalid_claim")
        if not _is_time(exp) or not _is_time(iat):
            raise _unauthenticated(
                "the token's 'exp' or 'iat' claim is not a time", "invalid_claim"
            )
        if not isinstance(perms, list) or not all(isinstance(p, str) for p in perms):
            raise _unauthenticated(
                "the token's 'permissions' claim is not a list of names", "invalid_claim"
            )
        if self._clock() >= exp:
            raise _unauthenticated("the token has expired; issue a new one", "expired")
        return Claims(
            subject=sub,
            # Names this version does not know grant nothing.
            permissions=frozenset(perms) & PERMISSIONS,
            expires_at=dt.datetime.fromtimestamp(exp, dt.UTC),
        )


def _is_time(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def bearer_token(authorization_header: str | None) -> str:
    """The token in ``Authorization: Bearer <token>``; Unauthenticated if absent or otherwise."""
    if not authorization_header or not authorization_header.strip():
        raise _unauthenticated(
            "missing Authorization header; send 'Authorization: Bearer <token>'", "missing"
        )
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
        raise _unauthenticated(
            "the Authorization header must be 'Bearer <token>'", "malformed_header"
        )
    return token


# --- the signing key -----------------------------------------------------------------------------


def load_or_create_key(data_dir: Path) -> bytes:
    """``<data_dir>/keys/jwt.key``: read it, or create it (0600) if it is missing.

    ``private_files.create_private`` links a fully written temp file into place, so two processes
    starting together agree on one key (the loser reads the winner's). A key readable by group or
    others is refused.
    """
    if not data_dir.is_dir():
        raise InvalidInput(f"data directory {data_dir} does not exist")
    path = data_dir / KEY_RELATIVE_PATH
    if not path.exists():
        path.parent.mkdir(mode=0o700, exist_ok=True)
        create_private(path, secrets.token_bytes(KEY_BYTES))
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise InvalidInput(
            f"token key {path} is readable by others (mode {mode:o}); run `chmod 600 {path}`"
        )
    key = path.read_bytes()
    if len(key) < KEY_BYTES:
        raise InvalidInput(
            f"token key {path} is shorter than {KEY_BYTES} bytes; delete it to regenerate"
        )
    return key


# --- FastAPI -------------------------------------------------------------------------------------

# Declares the scheme in OpenAPI; parsing stays ours so the errors say what to do next.
_bearer_scheme = HTTPBearer(auto_error=False, description="Token from `shipyard token create`")


def require_permission(permission: str) -> Callable[..., Awaitable[Claims]]:
    """A dependency returning the caller's Claims if their token carries ``permission``."""
    if permission not in PERMISSIONS:
        raise ValueError(f"unknown permission {permission!r}; known: {sorted(PERMISSIONS)}")

    async def dependency(
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer_scheme)],
    ) -> Claims:
        authority = getattr(request.app.state, "token_authority", None)
        if not isinstance(authority, TokenAuthority):
            raise RuntimeError("app.state.token_authority is not set to a TokenAuthority")
        claims = authority.verify(bearer_token(request.headers.get("authorization")))
        claims.require(permission)
        return claims

    dependency.__name__ = f"require_{permission.replace(':', '_')}"
    return dependency
