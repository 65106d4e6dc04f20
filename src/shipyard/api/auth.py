"""Who may do what: JWT bearer tokens with permission claims, and the FastAPI dependency.

``TokenAuthority`` signs and verifies tokens (the cryptography and the claims, nothing stored);
``api/tokens.py`` ``TokenService`` wraps it with the token registry (every token recorded, a
revocation list checked on every request) and is what ``shipyard serve`` puts on
``app.state.tokens``. Routes declare ``Depends(require_permission("deployment:create"))`` and,
for the service they act on, ``claims.require("deployment:create", service)``
(permissions may be scoped to services, see api/permissions.py). ``shipyard token create``
(cli/token.py) issues tokens through the same service. Failures raise ``Unauthenticated`` (401) or
``PermissionDenied`` (403); the API's error mapper answers them.

Every token carries a random id (``jti``) and a lifetime no longer than the server's maximum
(``max_ttl_seconds``, 90 days unless ``shipyard serve --max-token-ttl-days`` says otherwise):
``issue`` refuses a longer one, and ``verify`` refuses a token whose ``exp - iat`` is longer, so
a token minted elsewhere with a stolen key and a ten-year lifetime is refused too. Tokens without
``jti`` (issued before ids existed) are refused with a message to issue a new one.

Tokens are HS256 only, signed with a 32-byte random key created on first use at
``<data_dir>/keys/jwt.key`` (mode 0600). The header's ``alg`` is checked before anything else, so
``none``, HS512 and RS256-headed tokens (algorithm confusion) are refused outright. Neither the key
nor a token ever appears in an error message or a log line.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeGuard

import jwt
from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jwt.exceptions import InvalidJTIError, InvalidSubjectError

from shipyard.api import permissions as perms_mod
from shipyard.api.permissions import DESCRIPTIONS, PERMISSIONS, Permission
from shipyard.errors import InvalidInput, PermissionDenied, Unauthenticated
from shipyard.private_files import create_private

__all__ = [
    "DEFAULT_MAX_TTL_SECONDS",
    "PERMISSIONS",
    "Claims",
    "IssuedToken",
    "TokenAuthority",
    "bearer_token",
    "load_or_create_key",
    "require_permission",
]

ALGORITHM = "HS256"
KEY_BYTES = 32
KEY_RELATIVE_PATH = Path("keys") / "jwt.key"
#: 16 random bytes, hex (32 characters: never a leading "-" on a command line).
TOKEN_ID_BYTES = 16
DEFAULT_TTL_SECONDS = 12 * 3600
DEFAULT_MAX_TTL_SECONDS = 90 * 24 * 3600
_REQUIRED_CLAIMS = ("sub", "iat", "exp", "iss", "permissions", "jti")
_TOKEN_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
_MAX_SUBJECT = 200


@dataclass(frozen=True)
class Claims:
    """A verified token: who, what they may do (for which services), until when, and its id."""

    subject: str
    #: The permission strings granted, as issued (``deployment:create:web-*``); strings this
    #: version cannot parse are left out: they grant nothing.
    permissions: frozenset[str]
    expires_at: dt.datetime
    token_id: str
    issued_at: dt.datetime

    @property
    def grants(self) -> frozenset[Permission]:
        return perms_mod.lenient(self.permissions)

    def _grants_of(self, base: str) -> list[Permission]:
        return sorted(g for g in self.grants if g.base == base)

    def has_permission(self, permission: str) -> bool:
        """Whether the token holds ``permission`` for at least one service."""
        return bool(self._grants_of(permission))

    def may(self, permission: str, service: str) -> bool:
        """Whether the token holds ``permission`` for ``service``."""
        return any(g.covers(service) for g in self._grants_of(permission))

    def everywhere(self, permission: str) -> bool:
        """Whether the token holds ``permission`` for every service (unscoped, or ``*``)."""
        return any(g.everywhere for g in self._grants_of(permission))

    def scopes(self, permission: str) -> list[str] | None:
        """The service globs ``permission`` is limited to; None if it covers every service."""
        grants = self._grants_of(permission)
        if any(g.everywhere for g in grants):
            return None
        return [g.scope for g in grants if g.scope is not None]

    def require(self, permission: str, service: str | None = None) -> None:
        """PermissionDenied unless this token carries ``permission`` (for ``service``, if
        given: a scoped grant must match it)."""
        if not self.has_permission(permission):
            raise PermissionDenied(
                f"token for {self.subject!r} lacks the {permission!r} permission; "
                f"issue one with `shipyard token create --permission {permission}`",
                required_permission=permission,
            )
        if service is not None and not self.may(permission, service):
            scopes = ", ".join(repr(s) for s in self.scopes(permission) or [])
            raise PermissionDenied(
                f"token for {self.subject!r} may {DESCRIPTIONS[permission]} only for services "
                f"matching {scopes}, not {service!r}",
                required_permission=f"{permission}:{service}",
            )

    def require_everywhere(self, permission: str) -> None:
        """PermissionDenied unless ``permission`` covers every service (e.g. ``/metrics``)."""
        self.require(permission)
        if not self.everywhere(permission):
            scopes = ", ".join(repr(s) for s in self.scopes(permission) or [])
            raise PermissionDenied(
                f"token for {self.subject!r} may {DESCRIPTIONS[permission]} only for services "
                f"matching {scopes}; this needs {permission!r} for every service",
                required_permission=permission,
            )


@dataclass(frozen=True)
class IssuedToken:
    """A freshly signed token and its claims (what the registry records, minus the token)."""

    token: str
    claims: Claims


def _unauthenticated(message: str, reason: str) -> Unauthenticated:
    return Unauthenticated(message, reason=reason)


class TokenAuthority:
    """Issues and verifies Shipyard's HS256 tokens with one shared key."""

    def __init__(
        self,
        key: bytes,
        issuer: str = "shipyard",
        *,
        clock: Callable[[], float] = time.time,
        max_ttl_seconds: int = DEFAULT_MAX_TTL_SECONDS,
    ) -> None:
        if not isinstance(key, bytes) or len(key) < KEY_BYTES:
            raise InvalidInput(f"the token signing key must be at least {KEY_BYTES} bytes")
        if not issuer:
            raise InvalidInput("the token issuer must not be empty")
        if isinstance(max_ttl_seconds, bool) or not isinstance(max_ttl_seconds, int):
            raise InvalidInput(f"max_ttl_seconds must be an integer, not {max_ttl_seconds!r}")
        if max_ttl_seconds <= 0:
            raise InvalidInput(
                f"the maximum token lifetime must be positive, not {max_ttl_seconds}"
            )
        self._key = key
        self.issuer = issuer
        self._clock = clock
        self.max_ttl_seconds = max_ttl_seconds

    def __repr__(self) -> str:  # never show the key
        return f"TokenAuthority(issuer={self.issuer!r})"

    @classmethod
    def from_data_dir(
        cls, data_dir: Path, *, max_ttl_seconds: int = DEFAULT_MAX_TTL_SECONDS
    ) -> TokenAuthority:
        """The authority for ``data_dir``, creating its key on first use."""
        return cls(load_or_create_key(data_dir), max_ttl_seconds=max_ttl_seconds)

    def issue(
        self, subject: str, permissions: Sequence[str], ttl_seconds: int = DEFAULT_TTL_SECONDS
    ) -> str:
        """A signed token (see ``mint``). Signing is all it does: the API accepts the token only
        once the registry has recorded it, so servers and the CLI issue through
        ``api.tokens.TokenService.issue``; tests of the cryptography call this."""
        return self.mint(subject, permissions, ttl_seconds).token

    def mint(
        self, subject: str, permissions: Sequence[str], ttl_seconds: int = DEFAULT_TTL_SECONDS
    ) -> IssuedToken:
        """A signed token for ``subject`` with ``permissions``, valid for ``ttl_seconds`` (at
        most ``max_ttl_seconds``), with a new random id; InvalidInput saying what is wrong."""
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
        perms_mod.parse_all(permissions)  # InvalidInput naming the bad one
        if not permissions:
            raise InvalidInput(
                f"a token needs at least one permission; valid: {perms_mod.help_text()}"
            )
        if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0:
            raise InvalidInput(f"ttl_seconds must be a positive integer, not {ttl_seconds!r}")
        if ttl_seconds > self.max_ttl_seconds:
            raise InvalidInput(
                f"a lifetime of {ttl_seconds} s is longer than the maximum token lifetime, "
                f"{describe_ttl(self.max_ttl_seconds)}; ask for less, or raise the limit with "
                "`shipyard serve --max-token-ttl-days N` (or SHIPYARD_MAX_TOKEN_TTL_DAYS)",
                max_ttl_seconds=self.max_ttl_seconds,
            )
        now = int(self._clock())
        # Hex: an id never starts with "-", which a command line would take for an option
        # (`shipyard token revoke -abc...`).
        token_id = secrets.token_hex(TOKEN_ID_BYTES)
        payload = {
            "sub": subject,
            "iat": now,
            "exp": now + ttl_seconds,
            "iss": self.issuer,
            "jti": token_id,
            "permissions": sorted(set(permissions)),
        }
        token = jwt.encode(payload, self._key, algorithm=ALGORITHM)
        return IssuedToken(token, self._claims(payload))

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
            if exc.claim == "jti":
                raise _unauthenticated(
                    "the token has no id ('jti'): it was issued before Shipyard recorded and "
                    "could revoke tokens, and is no longer accepted; issue a new one with "
                    "`shipyard token create`",
                    "missing_token_id",
                ) from exc
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
        except InvalidJTIError as exc:
            raise _unauthenticated(
                "the token's 'jti' claim is not a token id", "invalid_claim"
            ) from exc
        except jwt.DecodeError as exc:
            raise _unauthenticated("the bearer token is malformed", "malformed") from exc
        except jwt.PyJWTError as exc:
            raise _unauthenticated("the bearer token is invalid", "invalid") from exc
        return self._claims(payload)

    def _claims(self, payload: dict[str, Any]) -> Claims:
        sub, exp, iat, perms, jti = (
            payload.get(k) for k in ("sub", "exp", "iat", "permissions", "jti")
        )
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
        if not isinstance(jti, str) or not _TOKEN_ID.fullmatch(jti):
            raise _unauthenticated("the token's 'jti' claim is not a token id", "invalid_claim")
        if exp - iat > self.max_ttl_seconds:
            raise _unauthenticated(
                f"the token's lifetime ({int(exp - iat)} s) is longer than this server's maximum, "
                f"{describe_ttl(self.max_ttl_seconds)}; issue a shorter one with "
                "`shipyard token create --ttl-seconds`",
                "lifetime_too_long",
            )
        if self._clock() >= exp:
            raise _unauthenticated("the token has expired; issue a new one", "expired")
        return Claims(
            subject=sub,
            # Names this version does not know grant nothing.
            permissions=frozenset(str(p) for p in perms_mod.lenient(perms)),
            expires_at=dt.datetime.fromtimestamp(exp, dt.UTC),
            token_id=jti,
            issued_at=dt.datetime.fromtimestamp(iat, dt.UTC),
        )


def describe_ttl(seconds: int) -> str:
    """``7776000 s (90 days)``: a lifetime limit as people and flags say it."""
    days = seconds / 86400
    return f"{seconds} s ({days:g} day{'' if days == 1 else 's'})"


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


class Authenticator(Protocol):
    """What the dependency asks for a bearer token's claims (``api.tokens.TokenService``)."""

    async def authenticate(self, token: str) -> Claims: ...


def require_permission(permission: str) -> Callable[..., Awaitable[Claims]]:
    """A dependency returning the caller's Claims if their token is valid, recorded, not revoked
    and carries ``permission`` for at least one service. Routes acting on a service check
    ``claims.require(permission, service)`` once they know which."""
    if permission not in PERMISSIONS:
        raise ValueError(f"unknown permission {permission!r}; known: {sorted(PERMISSIONS)}")

    async def dependency(
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer_scheme)],
    ) -> Claims:
        tokens = getattr(request.app.state, "tokens", None)
        if tokens is None or not callable(getattr(tokens, "authenticate", None)):
            raise RuntimeError("app.state.tokens is not set to a TokenService")
        authenticator: Authenticator = tokens
        claims = await authenticator.authenticate(
            bearer_token(request.headers.get("authorization"))
        )
        claims.require(permission)
        return claims

    dependency.__name__ = f"require_{permission.replace(':', '_')}"
    return dependency
