"""The region registry and join tokens: which remote agents belong to this control plane.

Tables on ``store.db``'s metadata (the store's migrations make them):

- ``regions``: a joined (or waiting-to-join) region: its name, the agent's API URL, the serial
  of its current certificate and of the one before (accepted until it expires, so a renewal
  never has a moment where the agent's old certificate is refused), when it was added and when
  it joined. Removing a region deletes its row: its certificates are refused from then on.
- ``join_tokens``: one per ``shipyard region add``: its id, the SHA-256 of its secret (never the
  secret), its region, when it expires and when it was used. ``consume`` marks it used in the
  same statement that checks it, so two agents racing with one token get one join.

Synchronous like ``store.db.Store``; ``api/fleet_control.RegionService`` calls it through
``to_thread``, and ``shipyard region`` (cli/regions.py) directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Column, Engine, Float, RowMapping, String, Table, delete, insert, select
from sqlalchemy import update as sql_update
from sqlalchemy.exc import IntegrityError

from shipyard.errors import Conflict
from shipyard.store.db import metadata

regions = Table(
    "regions",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("agent_url", String(300)),
    Column("cert_serial", String(64)),
    Column("previous_serial", String(64)),
    Column("created_at", Float, nullable=False),
    Column("joined_at", Float),
)

join_tokens = Table(
    "join_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("secret_sha256", String(64), nullable=False),
    Column("region", String(63), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float),
)


@dataclass(frozen=True)
class RegionRow:
    """One registered region (times are UNIX seconds; None: not joined yet)."""

    name: str
    created_at: float
    agent_url: str | None = None
    cert_serial: str | None = None
    previous_serial: str | None = None
    joined_at: float | None = None

    def accepts(self, serial: str) -> bool:
        """Whether a certificate with ``serial`` is this region's current or previous one."""
        return serial in {s for s in (self.cert_serial, self.previous_serial) if s}


@dataclass(frozen=True)
class JoinTokenRow:
    id: str
    secret_sha256: str
    region: str
    created_at: float
    expires_at: float
    used_at: float | None = None


def _region(m: RowMapping) -> RegionRow:
    return RegionRow(**dict(m))


class RegionStore:
    """The ``regions`` and ``join_tokens`` tables (see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, name: str, token: JoinTokenRow, *, at: float) -> RegionRow:
        """Register ``name`` with its first join token, in one transaction; Conflict if the
        region exists."""
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(regions).values(name=name, created_at=at))
                conn.execute(insert(join_tokens).values(**token.__dict__))
        except IntegrityError as exc:
            raise Conflict(
                f"region {name!r} is already registered; `shipyard region remove {name}` first "
                "to join it again"
            ) from exc
        return RegionRow(name=name, created_at=at)

    def get(self, name: str) -> RegionRow | None:
        with self.engine.connect() as conn:
            found = conn.execute(select(regions).where(regions.c.name == name)).first()
        return _region(found._mapping) if found else None

    def list(self) -> Sequence[RegionRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(regions).order_by(regions.c.name)).all()
        return [_region(r._mapping) for r in rows]

    def remove(self, name: str) -> bool:
        """Delete the region and its unused tokens; False if it was not registered."""
        with self.engine.begin() as conn:
            gone = conn.execute(delete(regions).where(regions.c.name == name)).rowcount
            conn.execute(
                delete(join_tokens).where(
                    join_tokens.c.region == name, join_tokens.c.used_at.is_(None)
                )
            )
        return bool(gone)

    def token(self, token_id: str) -> JoinTokenRow | None:
        with self.engine.connect() as conn:
            found = conn.execute(select(join_tokens).where(join_tokens.c.id == token_id)).first()
        return JoinTokenRow(**dict(found._mapping)) if found else None

    def join(self, token_id: str, region: str, serial: str, agent_url: str, *, at: float) -> bool:
        """Use the token and record the region's first certificate and URL, atomically: False
        (nothing changed) if the token was used meanwhile, expired, or its region is gone."""
        with self.engine.begin() as conn:
            if conn.execute(select(regions.c.name).where(regions.c.name == region)).first() is None:
                return False
            used = conn.execute(
                sql_update(join_tokens)
                .where(
                    join_tokens.c.id == token_id,
                    join_tokens.c.region == region,
                    join_tokens.c.used_at.is_(None),
                    join_tokens.c.expires_at > at,
                )
                .values(used_at=at)
            ).rowcount
            if not used:
                return False
            conn.execute(
                sql_update(regions)
                .where(regions.c.name == region)
                .values(agent_url=agent_url, cert_serial=serial, previous_serial=None, joined_at=at)
            )
        return True

    def renew(self, region: str, presented: str, serial: str, agent_url: str) -> bool:
        """Make ``serial`` the region's current certificate (the presented one becomes the
        previous) and record its URL; False if the region is gone or ``presented`` is no longer
        one of its certificates (a renewal raced by another)."""
        with self.engine.begin() as conn:
            row = conn.execute(select(regions).where(regions.c.name == region)).first()
            if row is None or not _region(row._mapping).accepts(presented):
                return False
            conn.execute(
                sql_update(regions)
                .where(regions.c.name == region)
                .values(cert_serial=serial, previous_serial=presented, agent_url=agent_url)
            )
        return True
