"""The API's notification sinks, included by ``api/app.py`` (permission ``notifications:admin``)::

    GET    /api/v1/notifications/sinks              every sink (never a secret; a Slack URL
                                                    as its host only)
    POST   /api/v1/notifications/sinks              add one: {"name", "type": "webhook", "url",
                                                    "secret", "events"?, "max_attempts"?} or
                                                    {"name", "type": "slack", "url", ...}; 201
    DELETE /api/v1/notifications/sinks/{name}       remove it (its undelivered rows fail)
    POST   /api/v1/notifications/sinks/{name}/test  send a test notification now; says whether
                                                    the sink answered 2xx

Thin routes over ``notify/sinks.SinkService``; additions and removals are audited
(``notification_sink.added`` / ``.removed``: who, name, type, events; never a credential).
``shipyard notifications`` (cli/notifications.py) calls these.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Request

from shipyard.api import problems
from shipyard.api.auth import Claims, require_permission
from shipyard.api.context import AppContext
from shipyard.audit import AuditEvent
from shipyard.domain.clock import to_thread
from shipyard.domain.models import DNS_LABEL
from shipyard.errors import InvalidInput
from shipyard.notify import delivery
from shipyard.notify.config import parse_sink
from shipyard.notify.sinks import SinkService, SinkView

CanAdmin = Annotated[Claims, Depends(require_permission("notifications:admin"))]
Name = Annotated[str, Path(pattern=DNS_LABEL, max_length=63)]
_COMMON = (401, 403, 413, 500, 503)

router = APIRouter(tags=["notifications"])


def _sinks(request: Request) -> SinkService:
    context: AppContext = request.app.state.context
    if context.notifications is None:
        raise InvalidInput("this server has no notification store")
    return context.notifications


def _context(request: Request) -> AppContext:
    context: AppContext = request.app.state.context
    return context


Sinks = Annotated[SinkService, Depends(_sinks)]
Ctx = Annotated[AppContext, Depends(_context)]


async def _audit(c: AppContext, event_type: str, user: str, sink: SinkView) -> None:
    await c.audit.append(
        AuditEvent(
            event_type=event_type,
            user=user,
            detail={"sink": sink.name, "type": sink.type, "events": list(sink.events)},
        )
    )


@router.get("/api/v1/notifications/sinks", responses=problems.responses(*_COMMON))
async def list_sinks(_: CanAdmin, sinks: Sinks) -> dict[str, Any]:
    """Every sink: name, type, URL (a Slack one redacted), events, attempts, where it came from."""
    return {"sinks": [s.to_dict() for s in await to_thread(sinks.list)]}


@router.post(
    "/api/v1/notifications/sinks",
    status_code=201,
    responses=problems.responses(400, 409, 422, *_COMMON),
)
async def add_sink(
    body: Annotated[dict[str, Any], Body()], claims: CanAdmin, sinks: Sinks, c: Ctx
) -> dict[str, Any]:
    """Add a sink; its secret (webhook) or URL (Slack) is sealed and never shown again."""
    # Validated here rather than by FastAPI: its 422 would echo the input, a secret included.
    spec = parse_sink(body, "notification sink")
    added = await to_thread(sinks.add, spec, claims.subject)
    await _audit(c, "notification_sink.added", claims.subject, added)
    return added.to_dict()


@router.delete(
    "/api/v1/notifications/sinks/{name}", responses=problems.responses(404, 422, *_COMMON)
)
async def remove_sink(name: Name, claims: CanAdmin, sinks: Sinks, c: Ctx) -> dict[str, Any]:
    """Remove a sink; its notifications not delivered yet fail (``sink removed``)."""
    removed = await to_thread(sinks.remove, name)
    await _audit(c, "notification_sink.removed", claims.subject, removed)
    return {"name": removed.name, "removed": True}


@router.post(
    "/api/v1/notifications/sinks/{name}/test", responses=problems.responses(404, 422, *_COMMON)
)
async def try_sink(name: Name, _: CanAdmin, sinks: Sinks, c: Ctx) -> dict[str, Any]:
    """Send one test notification (``notification.test``) now, outside the outbox."""
    sink = await to_thread(sinks.get, name)
    error = await delivery.send_test(sinks, sink, c.pipeline.clock.now())
    return {"name": name, "delivered": error is None, "error": error}


async def deliveries(sinks: SinkService, deployment_id: str) -> list[dict[str, Any]]:
    """``GET /deployments/{id}``'s ``notifications``: each sink and event, its state
    (pending, delivered, failed), attempts, last error and when it was delivered."""
    rows = await to_thread(sinks.outbox.deliveries, deployment_id)
    return [
        {
            "sink": d.sink,
            "event": d.event,
            "state": d.state,
            "attempts": d.attempts,
            "last_error": d.last_error,
            "delivered_at": (
                None
                if d.delivered_at is None
                else dt.datetime.fromtimestamp(d.delivered_at, dt.UTC).isoformat()
            ),
        }
        for d in rows
    ]
