"""Notification sinks and the durable outbox of notifications to deliver (issue 16).

Tables (migration ``0005_notifications``):

- ``notification_sinks``: where notifications go. ``kind`` ``webhook`` (``url`` in clear, its
  HMAC key sealed in ``secret_sealed``) or ``slack`` (the incoming-webhook URL is itself a
  credential: sealed in ``url_sealed``, ``url`` empty). ``events``: a JSON list of the
  notification events it wants (empty: all). ``source``: ``api`` (added through the API or
  CLI) or ``config`` (``shipyard serve --config``: replaced at every start). Sealing is the
  caller's (``notify/sinks.py`` holds the ``Sealer``); this module stores bytes.
- ``notification_outbox``: one row per (event, sink) to deliver, written by ``enqueue`` INSIDE
  the transaction of the audit record that is the event (``audit/log.SqlAuditLog``'s
  ``on_append``), so an event is never recorded without its notifications nor the other way
  round. ``key`` is the receiver's idempotency key (stable across retries). ``state``
  ``pending`` -> ``delivered`` | ``failed``; a worker claims a due row by setting ``claimed_by``
  (a token of its own) and ``claimed_until``: another worker takes it only once that passed
  (a dead replica's claims expire), and only the current claimant may record the outcome.

``OutboxStore`` is synchronous (the delivery worker calls it through ``to_thread``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    or_,
    select,
    update,
)

metadata = MetaData()

SinkKind = Literal["webhook", "slack"]
SinkSource = Literal["api", "config"]
DeliveryState = Literal["pending", "delivered", "failed"]

notification_sinks = Table(
    "notification_sinks",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(63), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("url", String(2048), nullable=False),
    Column("url_sealed", LargeBinary),
    Column("secret_sealed", LargeBinary),
    Column("events", Text, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("source", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(256), nullable=False),
)

notification_outbox = Table(
    "notification_outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key", String(36), nullable=False, unique=True),
    Column("sink_id", String(36), nullable=False),
    Column("event", String(64), nullable=False),
    Column("audit_seq", Integer),
    Column("deployment_id", String(36)),
    Column("body", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("next_attempt_at", Float, nullable=False),
    Column("claimed_by", String(64)),
    Column("claimed_until", Float),
    Column("last_error", String(512)),
    Column("created_at", Float, nullable=False),
    Column("delivered_at", Float),
    Index("ix_notification_outbox_due", "state", "next_attempt_at"),
    Index("ix_notification_outbox_deployment", "deployment_id", "id"),
)


@dataclass(frozen=True)
class SinkRow:
    """A sink as stored (sealed values as bytes; ``events`` empty means all)."""

    id: str
    name: str
    kind: SinkKind
    url: str
    url_sealed: bytes | None
    secret_sealed: bytes | None
    events: tuple[str, ...]
    max_attempts: int
    source: SinkSource
    created_at: float
    created_by: str

    def wants(self, event: str) -> bool:
        return not self.events or event in self.events


@dataclass(frozen=True)
class OutboxRow:
    """One notification to deliver to one sink."""

    id: int
    key: str
    sink_id: str
    event: str
    audit_seq: int | None
    deployment_id: str | None
    body: str
    state: DeliveryState
    attempts: int
    max_attempts: int
    next_attempt_at: float
    claimed_by: str | None
    claimed_until: float | None
    last_error: str | None
    created_at: float
    delivered_at: float | None


@dataclass(frozen=True)
class Delivery:
    """A deployment's notification as ``GET /deployments/{id}`` shows it."""

    sink: str
    event: str
    state: DeliveryState
    attempts: int
    last_error: str | None
    delivered_at: float | None


def _sink(row: object) -> SinkRow:
    m = row._mapping  # type: ignore[attr-defined]
    return SinkRow(
        id=m["id"],
        name=m["name"],
        kind=m["kind"],
        url=m["url"],
        url_sealed=None if m["url_sealed"] is None else bytes(m["url_sealed"]),
        secret_sealed=None if m["secret_sealed"] is None else bytes(m["secret_sealed"]),
        events=tuple(json.loads(m["events"])),
        max_attempts=int(m["max_attempts"]),
        source=m["source"],
        created_at=float(m["created_at"]),
        created_by=m["created_by"],
    )


def _outbox(row: object) -> OutboxRow:
    m = row._mapping  # type: ignore[attr-defined]
    return OutboxRow(**{c.name: m[c.name] for c in notification_outbox.columns})


def new_sink_id() -> str:
    return str(uuid.uuid4())


def load_sinks(conn: Connection) -> list[SinkRow]:
    """Every sink, by name (inside the caller's transaction: ``enqueue``'s)."""
    return [_sink(r) for r in conn.execute(select(notification_sinks).order_by("name"))]


def enqueue(
    conn: Connection,
    sinks: Sequence[SinkRow],
    *,
    event: str,
    body: str,
    now: float,
    audit_seq: int | None = None,
    deployment_id: str | None = None,
) -> int:
    """A pending row per sink in ``sinks`` that wants ``event``, in the caller's transaction;
    returns how many."""
    rows = [
        {
            "key": str(uuid.uuid4()),
            "sink_id": s.id,
            "event": event,
            "audit_seq": audit_seq,
            "deployment_id": deployment_id,
            "body": body,
            "state": "pending",
            "attempts": 0,
            "max_attempts": s.max_attempts,
            "next_attempt_at": now,
            "created_at": now,
        }
        for s in sinks
        if s.wants(event)
    ]
    if rows:
        conn.execute(insert(notification_outbox), rows)
    return len(rows)


class OutboxStore:
    """Sinks and outbox rows over the store's engine (synchronous; see the module docstring)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- sinks -----------------------------------------------------------------------------

    def sinks(self) -> list[SinkRow]:
        with self.engine.connect() as conn:
            return load_sinks(conn)

    def sink(self, name: str) -> SinkRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(notification_sinks).where(notification_sinks.c.name == name)
            ).first()
        return _sink(row) if row else None

    def sinks_by_id(self, ids: Sequence[str]) -> dict[str, SinkRow]:
        if not ids:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(notification_sinks).where(notification_sinks.c.id.in_(list(ids)))
            ).all()
        return {r.id: _sink(r) for r in rows}

    def add_sink(self, sink: SinkRow) -> bool:
        """Store ``sink``; False if one of that name exists already."""
        with self.engine.begin() as conn:
            seen = conn.execute(
                select(notification_sinks.c.id).where(notification_sinks.c.name == sink.name)
            ).first()
            if seen is not None:
                return False
            conn.execute(insert(notification_sinks).values(**_sink_values(sink)))
        return True

    def remove_sink(self, name: str) -> SinkRow | None:
        """Delete the sink ``name`` (its pending rows fail as ``sink removed`` when next
        claimed); the row it was, or None."""
        with self.engine.begin() as conn:
            row = conn.execute(
                select(notification_sinks).where(notification_sinks.c.name == name)
            ).first()
            if row is None:
                return None
            conn.execute(delete(notification_sinks).where(notification_sinks.c.name == name))
        return _sink(row)

    def replace_config_sinks(self, sinks: Sequence[SinkRow]) -> None:
        """The config file's sinks (``source`` config) become exactly ``sinks``: same-named
        ones are replaced (an API sink of that name too: the file wins), others of the file
        removed. One transaction, so no event sees half of it."""
        names = [s.name for s in sinks]
        with self.engine.begin() as conn:
            conn.execute(
                delete(notification_sinks).where(
                    or_(
                        notification_sinks.c.source == "config",
                        notification_sinks.c.name.in_(names),
                    )
                )
            )
            for s in sinks:
                conn.execute(insert(notification_sinks).values(**_sink_values(s)))

    # --- outbox ----------------------------------------------------------------------------

    def claim(self, worker: str, now: float, seconds: float, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` due pending rows nobody holds a live claim on, claimed by
        ``worker`` until ``now + seconds``. Each row is claimed by a conditional UPDATE, so of
        two workers racing for it exactly one gets it (PostgreSQL re-checks the condition
        after the other's write; SQLite has one writer)."""
        with self.engine.connect() as conn:
            ids = [
                int(r[0])
                for r in conn.execute(
                    select(notification_outbox.c.id)
                    .where(
                        notification_outbox.c.state == "pending",
                        notification_outbox.c.next_attempt_at <= now,
                        _unclaimed(now),
                    )
                    .order_by(notification_outbox.c.id)
                    .limit(limit)
                )
            ]
        claimed: list[OutboxRow] = []
        for row_id in ids:
            with self.engine.begin() as conn:
                done = conn.execute(
                    update(notification_outbox)
                    .where(
                        notification_outbox.c.id == row_id,
                        notification_outbox.c.state == "pending",
                        _unclaimed(now),
                    )
                    .values(claimed_by=worker, claimed_until=now + seconds)
                )
                if done.rowcount == 1:
                    row = conn.execute(
                        select(notification_outbox).where(notification_outbox.c.id == row_id)
                    ).one()
                    claimed.append(_outbox(row))
        return claimed

    def release_claims(self, prefix: str) -> int:
        """Let go of the claims whose holder starts with ``prefix`` (a replica starting again:
        ``<replica id>:``, its previous life's claims, which nobody else holds); how many."""
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with self.engine.begin() as conn:
            done = conn.execute(
                update(notification_outbox)
                .where(
                    notification_outbox.c.state == "pending",
                    notification_outbox.c.claimed_by.like(escaped + "%", escape="\\"),
                )
                .values(claimed_by=None, claimed_until=None)
            )
            return int(done.rowcount)

    def mark_delivered(self, row_id: int, worker: str, now: float) -> bool:
        """The claimant delivered it; False if its claim was lost (another took it)."""
        return self._finish(
            row_id,
            worker,
            state="delivered",
            attempts=notification_outbox.c.attempts + 1,
            delivered_at=now,
            last_error=None,
        )

    def mark_attempt_failed(
        self, row_id: int, worker: str, error: str, *, retry_at: float | None
    ) -> bool:
        """One attempt failed: pending again from ``retry_at``, or ``failed`` for good when
        None. False if the claim was lost."""
        return self._finish(
            row_id,
            worker,
            state="pending" if retry_at is not None else "failed",
            attempts=notification_outbox.c.attempts + 1,
            next_attempt_at=retry_at
            if retry_at is not None
            else notification_outbox.c.next_attempt_at,
            last_error=error[:500],
        )

    def _finish(self, row_id: int, worker: str, **values: object) -> bool:
        with self.engine.begin() as conn:
            done = conn.execute(
                update(notification_outbox)
                .where(
                    notification_outbox.c.id == row_id,
                    notification_outbox.c.claimed_by == worker,
                    notification_outbox.c.state == "pending",
                )
                .values(claimed_by=None, claimed_until=None, **values)
            )
            return bool(done.rowcount == 1)

    def rows(self, deployment_id: str | None = None) -> list[OutboxRow]:
        query = select(notification_outbox).order_by(notification_outbox.c.id)
        if deployment_id is not None:
            query = query.where(notification_outbox.c.deployment_id == deployment_id)
        with self.engine.connect() as conn:
            return [_outbox(r) for r in conn.execute(query)]

    def deliveries(self, deployment_id: str) -> list[Delivery]:
        """A deployment's notifications, oldest first, with the sinks' names (a removed
        sink's show as ``(removed)``)."""
        query = (
            select(notification_outbox, notification_sinks.c.name.label("sink_name"))
            .select_from(
                notification_outbox.outerjoin(
                    notification_sinks, notification_sinks.c.id == notification_outbox.c.sink_id
                )
            )
            .where(notification_outbox.c.deployment_id == deployment_id)
            .order_by(notification_outbox.c.id)
        )
        with self.engine.connect() as conn:
            return [
                Delivery(
                    sink=r.sink_name or "(removed)",
                    event=r.event,
                    state=r.state,
                    attempts=int(r.attempts),
                    last_error=r.last_error,
                    delivered_at=r.delivered_at,
                )
                for r in conn.execute(query)
            ]


def _unclaimed(now: float) -> ColumnElement[bool]:
    return or_(
        notification_outbox.c.claimed_until.is_(None), notification_outbox.c.claimed_until <= now
    )


def _sink_values(sink: SinkRow) -> dict[str, object]:
    return {
        "id": sink.id,
        "name": sink.name,
        "kind": sink.kind,
        "url": sink.url,
        "url_sealed": sink.url_sealed,
        "secret_sealed": sink.secret_sealed,
        "events": json.dumps(list(sink.events)),
        "max_attempts": sink.max_attempts,
        "source": sink.source,
        "created_at": sink.created_at,
        "created_by": sink.created_by,
    }
