"""Sinks: adding, listing, removing them with their credentials sealed, and the outbox writer.

``SinkService`` is what the API (``api/notifications.py``) and ``serve --config``
(``api/context.py``, through ``apply_config``) call; it seals a webhook's HMAC key and a Slack
URL with ``security/sealing.Sealer`` (the key outside the database) before they reach the store
and opens them only for the delivery worker (``notify/delivery.py``). ``SinkView`` is a sink as
anyone may see it: never a secret, a Slack URL only as its host.

``OutboxWriter`` is ``SqlAuditLog``'s ``on_append`` (and the checkpoint publisher's
``on_publish``): it runs INSIDE the audit record's transaction and writes that record's
notifications there (``store/outbox.enqueue``), so both commit or neither does.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Connection, select

from shipyard.audit.chain import AuditRecord
from shipyard.audit.log import Publication
from shipyard.errors import Conflict, NotFound
from shipyard.notify import events
from shipyard.notify.config import SlackSink, WebhookSink
from shipyard.security.sealing import Sealer
from shipyard.store.db import deployments
from shipyard.store.outbox import OutboxStore, SinkRow, SinkSource, enqueue, load_sinks, new_sink_id


@dataclass(frozen=True)
class SinkView:
    """A sink as the API and the CLI show it (no credential)."""

    name: str
    type: str
    url: str
    events: tuple[str, ...]
    max_attempts: int
    source: str
    created_at: dt.datetime
    created_by: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "url": self.url,
            "events": list(self.events),
            "max_attempts": self.max_attempts,
            "source": self.source,
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
        }


def redacted(url: str) -> str:
    """A credential URL shown as its scheme and host only."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}/..."


def _about(sink_id: str, what: str) -> str:
    return f"notification_sink:{sink_id}:{what}"


class SinkService:
    """Sinks over an ``OutboxStore``, credentials sealed with ``sealer``."""

    def __init__(self, outbox: OutboxStore, sealer: Sealer, clock: Callable[[], float]) -> None:
        self.outbox = outbox
        self._sealer = sealer
        self._clock = clock

    def _row(
        self,
        spec: WebhookSink | SlackSink,
        created_by: str,
        source: SinkSource,
        sink_id: str | None = None,
    ) -> SinkRow:
        sink_id = sink_id or new_sink_id()
        if isinstance(spec, WebhookSink):
            secret = spec.secret.get_secret_value().encode()
            url, url_sealed = spec.url, None
            secret_sealed = self._sealer.seal(secret, _about(sink_id, "secret"))
        else:
            url_value = spec.url.get_secret_value()
            url, secret_sealed = redacted(url_value), None
            url_sealed = self._sealer.seal(url_value.encode(), _about(sink_id, "url"))
        return SinkRow(
            id=sink_id,
            name=spec.name,
            kind=spec.type,
            url=url,
            url_sealed=url_sealed,
            secret_sealed=secret_sealed,
            events=tuple(spec.events),
            max_attempts=spec.max_attempts,
            source=source,
            created_at=self._clock(),
            created_by=created_by,
        )

    def add(self, spec: WebhookSink | SlackSink, created_by: str) -> SinkView:
        """Store a new sink; Conflict if the name is taken."""
        row = self._row(spec, created_by, "api")
        if not self.outbox.add_sink(row):
            raise Conflict(
                f"a notification sink named {spec.name!r} exists: remove it first "
                f"(shipyard notifications rm {spec.name}) or choose another name"
            )
        return view(row)

    def apply_config(self, specs: tuple[WebhookSink | SlackSink, ...]) -> None:
        """``serve --config``'s sinks replace the previous file's (``replace_config_sinks``). A
        sink the store has by that name keeps its id: its notifications not delivered yet
        (written before a restart) still go to it."""
        ids = {s.name: s.id for s in self.outbox.sinks()}
        self.outbox.replace_config_sinks(
            [self._row(s, "config", "config", ids.get(s.name)) for s in specs]
        )

    def list(self) -> list[SinkView]:
        return [view(r) for r in self.outbox.sinks()]

    def get(self, name: str) -> SinkRow:
        row = self.outbox.sink(name)
        if row is None:
            raise NotFound(
                f"no notification sink named {name!r}: `shipyard notifications list` shows them"
            )
        return row

    def remove(self, name: str) -> SinkView:
        row = self.outbox.remove_sink(name)
        if row is None:
            raise NotFound(
                f"no notification sink named {name!r}: `shipyard notifications list` shows them"
            )
        return view(row)

    def secret(self, sink: SinkRow) -> bytes | None:
        """A webhook's HMAC key (None for Slack). SealingError if the key file changed."""
        if sink.secret_sealed is None:
            return None
        return self._sealer.open(sink.secret_sealed, _about(sink.id, "secret"))

    def target(self, sink: SinkRow) -> str:
        """The URL to POST to (a Slack sink's opened from its seal)."""
        if sink.url_sealed is None:
            return sink.url
        return self._sealer.open(sink.url_sealed, _about(sink.id, "url")).decode()


def view(row: SinkRow) -> SinkView:
    return SinkView(
        name=row.name,
        type=row.kind,
        url=row.url,
        events=row.events,
        max_attempts=row.max_attempts,
        source=row.source,
        created_at=dt.datetime.fromtimestamp(row.created_at, dt.UTC),
        created_by=row.created_by,
    )


class OutboxWriter:
    """Writes an event's notifications in the transaction that records it (module docstring).
    ``clock``: the rows' creation and first due time."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    def on_append(self, conn: Connection, record: AuditRecord) -> None:
        """``SqlAuditLog``'s hook: ``record`` was just inserted on ``conn``."""
        event = events.event_of(record.event_type, record.detail)
        if event is None:
            return
        sinks = [s for s in load_sinks(conn) if s.wants(event)]
        if not sinks:
            return
        doc = _deployment_doc(conn, record.deployment_id)
        enqueue(
            conn,
            sinks,
            event=event,
            body=events.body(event, record, doc),
            now=self._clock(),
            audit_seq=record.seq,
            deployment_id=record.deployment_id,
        )

    def on_publish(self, conn: Connection, publication: Publication) -> None:
        """The checkpoint publisher's hook: a witness accepted ``publication``."""
        sinks = [s for s in load_sinks(conn) if s.wants(events.CHECKPOINT_EVENT)]
        if not sinks:
            return
        enqueue(
            conn,
            sinks,
            event=events.CHECKPOINT_EVENT,
            body=events.checkpoint_body(
                publication.witness,
                publication.tree_size,
                publication.root_hash,
                publication.published_at,
            ),
            now=self._clock(),
        )


def _deployment_doc(conn: Connection, deployment_id: str | None) -> dict[str, Any] | None:
    if deployment_id is None:
        return None
    row = conn.execute(select(deployments.c.doc).where(deployments.c.id == deployment_id)).first()
    if row is None:
        return None
    try:
        doc = json.loads(row[0])
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
