"""The token registry: every token Shipyard issued, whether it is revoked, and the lifetime limit.

Kept in the deployment store's database (its own tables, made by ``store/migrations``), so
every control plane sharing the store sees a revocation at once: the API looks the
token's id up on every request (``api/tokens.py`` ``TokenService.authenticate``, one primary-key
read). Rows hold the token's id (``jti``), subject, permissions and times — never the token: a
copy of this table grants nothing.

``token_policy`` holds one row, the maximum lifetime the server enforces, written by
``shipyard serve`` at start (``--max-token-ttl-days``) so that ``shipyard token create``, another
process, refuses a longer token with the server's own limit.

Synchronous like ``store.db.Store``; ``TokenService`` calls it through ``to_thread``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    RowMapping,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from shipyard.errors import Conflict, NotFound

metadata = MetaData()

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("subject", String(200), nullable=False),
    Column("permissions", Text, nullable=False),  # JSON list of strings
    Column("issued_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("issued_by", String(256)),
    Column("revoked_at", Float),
    Column("revoked_by", String(256)),
)

token_policy = Table(
    "token_policy",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("max_ttl_seconds", Integer, nullable=False),
)


@dataclass(frozen=True)
class TokenRow:
    """One issued token as recorded (times are UNIX seconds)."""

    id: str
    subject: str
    permissions: tuple[str, ...]
    issued_at: float
    expires_at: float
    issued_by: str | None = None
    revoked_at: float | None = None
    revoked_by: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def _row(mapping: RowMapping) -> TokenRow:
    m: dict[str, Any] = dict(mapping)
    m["permissions"] = tuple(json.loads(m["permissions"]))
    return TokenRow(**m)


class TokenStore:
    """The ``tokens`` and ``token_policy`` tables (of an engine from ``store.engine``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(self, row: TokenRow) -> None:
        """Insert a newly issued token; Conflict if its id is taken (ids are random: a bug)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    insert(tokens).values(
                        id=row.id,
                        subject=row.subject,
                        permissions=json.dumps(list(row.permissions)),
                        issued_at=row.issued_at,
                        expires_at=row.expires_at,
                        issued_by=row.issued_by,
                        revoked_at=row.revoked_at,
                        revoked_by=row.revoked_by,
                    )
                )
        except IntegrityError as exc:
            raise Conflict(f"token id {row.id} is already recorded") from exc

    def get(self, token_id: str) -> TokenRow | None:
        with self.engine.connect() as conn:
            found = conn.execute(select(tokens).where(tokens.c.id == token_id)).first()
        return _row(found._mapping) if found else None

    def list(self) -> Sequence[TokenRow]:
        """Every recorded token, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(tokens).order_by(tokens.c.issued_at.desc())).all()
        return [_row(r._mapping) for r in rows]

    def revoke(self, token_id: str, *, by: str, at: float) -> tuple[TokenRow, bool]:
        """Mark ``token_id`` revoked; returns the row and whether this call revoked it (False:
        it already was, and keeps its first revocation). NotFound for an unknown id."""
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(tokens)
                .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                .values(revoked_at=at, revoked_by=by)
            ).rowcount
            found = conn.execute(select(tokens).where(tokens.c.id == token_id)).first()
        if found is None:
            raise NotFound(f"no token with id {token_id!r}; `shipyard token list` shows them")
        return _row(found._mapping), changed == 1

    def max_ttl_seconds(self) -> int | None:
        """The lifetime limit the server last started with; None if none has started yet."""
        with self.engine.connect() as conn:
            found = conn.execute(
                select(token_policy.c.max_ttl_seconds).where(token_policy.c.id == 1)
            ).first()
        return int(found[0]) if found else None

    def set_max_ttl_seconds(self, seconds: int) -> None:
        """Record the limit (``shipyard serve`` at start). Replicas starting together may both
        find no row: the second insert fails on the key and its write becomes an update."""
        for attempt in range(2):
            try:
                with self.engine.begin() as conn:
                    done = conn.execute(
                        update(token_policy)
                        .where(token_policy.c.id == 1)
                        .values(max_ttl_seconds=seconds)
                    ).rowcount
                    if not done:
                        conn.execute(insert(token_policy).values(id=1, max_ttl_seconds=seconds))
                return
            except IntegrityError:
                if attempt:
                    raise
