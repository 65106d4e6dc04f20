"""Tokens as the server keeps them: issued and recorded, listed, revoked, checked per request.

``TokenService`` joins the signer (``api.auth.TokenAuthority``), the registry
(``store.tokens.TokenStore``) and the audit log. ``shipyard serve`` builds one in
``api.context.build_context`` and puts it on ``app.state.tokens``; the auth dependency calls
``authenticate`` on every request, the ``/api/v1/tokens`` routes call ``list`` and ``revoke``,
and the CLI (``shipyard token create|list|revoke``, cli/token.py, and the short-lived tokens
of cli/client.py and cli/demo.py) builds one over the data directory with ``for_data_dir``.

A token is accepted only if the registry knows its id and has not revoked it, and the record
says the same as the token (subject, permissions, times): the registry is an allow-list, so a
token signed outside ``issue`` (a stolen key) is refused even before anyone revokes anything.
The lookup is one primary-key read per request, with no cache in the process, so a revocation
made by any process sharing the store holds at once on every server.

``token.created`` and ``token.revoked`` are audited with who did it. The CLI appends to the
audit trail directly: ``SqlAuditLog``'s appends are serialised across processes (a lock file and
``BEGIN IMMEDIATE``), so a CLI append between two of the server's is safe.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from shipyard.api.auth import (
    DEFAULT_MAX_TTL_SECONDS,
    DEFAULT_TTL_SECONDS,
    Claims,
    IssuedToken,
    TokenAuthority,
)
from shipyard.audit import ANCHOR_FILENAME, AuditEvent, AuditLog, SqlAuditLog
from shipyard.domain.clock import to_thread
from shipyard.errors import InvalidInput, Unauthenticated
from shipyard.store.engine import open_engine
from shipyard.store.tokens import TokenRow, TokenStore


def registry_row(issued: IssuedToken, issued_by: str) -> TokenRow:
    """What the registry keeps of a token: its claims, never the token."""
    c = issued.claims
    return TokenRow(
        id=c.token_id,
        subject=c.subject,
        permissions=tuple(sorted(c.permissions)),
        issued_at=c.issued_at.timestamp(),
        expires_at=c.expires_at.timestamp(),
        issued_by=issued_by,
    )


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


class TokenService:
    """Issue, list, revoke and authenticate tokens against the registry (see module docstring)."""

    def __init__(
        self,
        authority: TokenAuthority,
        store: TokenStore,
        audit: AuditLog | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.authority = authority
        self.store = store
        self.audit = audit
        self._clock = clock

    def close(self) -> None:
        """Release the store's connections (the CLI's service owns its engine)."""
        self.store.engine.dispose()

    @classmethod
    def for_data_dir(
        cls,
        data_dir: Path,
        *,
        database: str | None = None,
        max_ttl_seconds: int | None = None,
        shared_dir: Path | None = None,
    ) -> TokenService:
        """The service over ``data_dir``'s audit anchor, the store ``database`` (None: SQLite in
        ``data_dir``) and the key in ``shared_dir`` (default ``data_dir``; ``serve
        --shared-dir``): the CLI's view.

        ``max_ttl_seconds`` None: the limit the server last started with (``token_policy``),
        else the default of 90 days. InvalidInput if ``data_dir`` does not exist (it is not
        created: a typo must not start a new, empty server)."""
        if not data_dir.is_dir():
            raise InvalidInput(f"data directory {data_dir} does not exist")
        engine = open_engine(database, data_dir)
        store = TokenStore(engine)
        limit = max_ttl_seconds or store.max_ttl_seconds() or DEFAULT_MAX_TTL_SECONDS
        authority = TokenAuthority.from_data_dir(shared_dir or data_dir, max_ttl_seconds=limit)
        return cls(authority, store, SqlAuditLog(engine, data_dir / ANCHOR_FILENAME))

    async def issue(
        self,
        subject: str,
        permissions: Sequence[str],
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        *,
        issued_by: str,
    ) -> IssuedToken:
        """Sign a token, record it and audit ``token.created``; InvalidInput for bad input
        (nothing recorded)."""
        issued = self.authority.mint(subject, permissions, ttl_seconds)
        c = issued.claims
        row = registry_row(issued, issued_by)
        await to_thread(self.store.record, row)
        await self._audit(
            "token.created",
            issued_by,
            token_id=c.token_id,
            subject=c.subject,
            permissions=list(row.permissions),
            expires_at=c.expires_at.isoformat(),
        )
        return issued

    async def list(self) -> Sequence[TokenRow]:
        return await to_thread(self.store.list)

    async def revoke(
        self, token_id: str, *, by: str, by_token: str | None = None
    ) -> tuple[TokenRow, bool]:
        """Revoke ``token_id`` (NotFound if unknown); returns its row and whether this call
        revoked it. Revoking twice keeps (and audits) only the first revocation."""
        row, changed = await to_thread(self.store.revoke, token_id, by=by, at=self._clock())
        if changed:
            await self._audit(
                "token.revoked", by, token_id=token_id, subject=row.subject, by_token=by_token
            )
        return row, changed

    async def authenticate(self, token: str) -> Claims:
        """The token's claims if it verifies and the registry holds it, unrevoked and as
        issued; Unauthenticated saying why not (``detail["reason"]``)."""
        claims = self.authority.verify(token)
        row = await to_thread(self.store.get, claims.token_id)
        if row is None:
            raise Unauthenticated(
                f"token {claims.token_id} is not in this server's token registry (tokens are "
                "recorded when `shipyard token create` issues them); issue a new one",
                reason="unknown_token",
            )
        if row.revoked_at is not None:
            raise Unauthenticated(
                f"token {row.id} was revoked at {_iso(row.revoked_at)} by {row.revoked_by}; "
                "ask for a new one",
                reason="revoked",
                token_id=row.id,
            )
        if (
            row.subject != claims.subject
            or frozenset(row.permissions) != claims.permissions
            or row.issued_at != claims.issued_at.timestamp()
            or row.expires_at != claims.expires_at.timestamp()
        ):
            raise Unauthenticated(
                f"token {row.id} does not match the registry's record of it; issue a new one",
                reason="registry_mismatch",
            )
        return claims

    async def _audit(self, event_type: str, user: str, **detail: object) -> None:
        if self.audit is not None:
            await self.audit.append(
                AuditEvent(
                    event_type=event_type,
                    user=user,
                    detail={k: v for k, v in detail.items() if v is not None},
                )
            )
