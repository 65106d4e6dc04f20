"""App secrets at rest: the ``app_secrets`` table (migration ``0004_secrets``).

One row per version of a service's secret: ``(service, name, version)`` is unique, versions
count up from 1 per name and are never reused (``rm`` then ``set`` again gives the next number).
``sealed`` is the value as ``security/sealing.Sealer`` sealed it, bound to
``secret/<service>/<name>/<version>`` — this module never sees a value, only sealed bytes, and
the key is a file outside the database, so a copy of the database reveals nothing.

``remove`` marks every version of a name deleted (``deleted_at``/``deleted_by``): a new
deployment no longer finds it (``current``), but the rows stay, so a rollback to a revision that
recorded one of those versions restores exactly that value (``sealed``). Nothing is pruned:
every version is kept (a secret is small; the history of who set what is the audit trail's).

Synchronous like ``store.db.Store``; ``security/app_secrets.AppSecrets`` calls it through
``to_thread`` and does the sealing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from sqlalchemy import (
    Column,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    and_,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

metadata = MetaData()

app_secrets = Table(
    "app_secrets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("service", String(63), nullable=False),
    Column("name", String(256), nullable=False),
    Column("version", Integer, nullable=False),
    Column("sealed", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(256), nullable=False),
    Column("deleted_at", Float),
    Column("deleted_by", String(256)),
    Index("ux_app_secrets_version", "service", "name", "version", unique=True),
)

#: Tries of ``add`` when another writer took the same next version at the same moment.
_ADD_TRIES = 5


@dataclass(frozen=True)
class SecretVersion:
    """One version of a secret as listed (never its value): who set it and when (UNIX s)."""

    service: str
    name: str
    version: int
    created_at: float
    created_by: str


class SecretStore:
    """The ``app_secrets`` table of an engine from ``store.engine`` (migrated)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(
        self, service: str, name: str, seal: Callable[[int], bytes], *, at: float, by: str
    ) -> SecretVersion:
        """Store the next version of ``service``'s ``name``: ``seal(version)`` gives its sealed
        value (the version is part of what it is bound to). Two writers at once: the loser's
        insert fails on the unique key and it tries the next number."""
        for attempt in range(_ADD_TRIES):
            try:
                with self.engine.begin() as conn:
                    last = conn.execute(
                        select(func.max(app_secrets.c.version)).where(
                            app_secrets.c.service == service, app_secrets.c.name == name
                        )
                    ).scalar()
                    version = int(last or 0) + 1
                    conn.execute(
                        insert(app_secrets).values(
                            service=service,
                            name=name,
                            version=version,
                            sealed=seal(version),
                            created_at=at,
                            created_by=by,
                        )
                    )
                return SecretVersion(service, name, version, at, by)
            except IntegrityError:
                if attempt == _ADD_TRIES - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def remove(self, service: str, name: str, *, at: float, by: str) -> int | None:
        """Mark every version of ``name`` deleted; the newest version it had, or None when it
        was not set (or already removed)."""
        with self.engine.begin() as conn:
            newest = conn.execute(
                select(func.max(app_secrets.c.version)).where(
                    app_secrets.c.service == service,
                    app_secrets.c.name == name,
                    app_secrets.c.deleted_at.is_(None),
                )
            ).scalar()
            if newest is None:
                return None
            conn.execute(
                update(app_secrets)
                .where(
                    app_secrets.c.service == service,
                    app_secrets.c.name == name,
                    app_secrets.c.deleted_at.is_(None),
                )
                .values(deleted_at=at, deleted_by=by)
            )
        return int(newest)

    def list(self, service: str) -> list[SecretVersion]:
        """The newest version of each secret ``service`` has (removed ones left out), by name."""
        newest = (
            select(app_secrets.c.name, func.max(app_secrets.c.version).label("version"))
            .where(app_secrets.c.service == service, app_secrets.c.deleted_at.is_(None))
            .group_by(app_secrets.c.name)
            .subquery()
        )
        query = (
            select(
                app_secrets.c.name,
                app_secrets.c.version,
                app_secrets.c.created_at,
                app_secrets.c.created_by,
            )
            .join(
                newest,
                and_(
                    app_secrets.c.name == newest.c.name,
                    app_secrets.c.version == newest.c.version,
                ),
            )
            .where(app_secrets.c.service == service)
            .order_by(app_secrets.c.name)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [SecretVersion(service, r.name, r.version, r.created_at, r.created_by) for r in rows]

    def current(self, service: str, names: Collection[str]) -> dict[str, int]:
        """The newest live version of each of ``names`` that ``service`` has (a name not set, or
        removed, is absent from the answer)."""
        if not names:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(app_secrets.c.name, func.max(app_secrets.c.version))
                .where(
                    app_secrets.c.service == service,
                    app_secrets.c.name.in_(sorted(names)),
                    app_secrets.c.deleted_at.is_(None),
                )
                .group_by(app_secrets.c.name)
            ).all()
        return {str(name): int(version) for name, version in rows}

    def sealed(self, service: str, versions: Mapping[str, int]) -> dict[str, bytes]:
        """The sealed value of each ``{name: version}`` (removed ones too: a rollback needs
        them); a pair the table does not hold is absent from the answer."""
        if not versions:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(app_secrets.c.name, app_secrets.c.version, app_secrets.c.sealed).where(
                    app_secrets.c.service == service,
                    app_secrets.c.name.in_(sorted(versions)),
                )
            ).all()
        return {
            str(r.name): bytes(r.sealed) for r in rows if versions.get(r.name) == int(r.version)
        }
