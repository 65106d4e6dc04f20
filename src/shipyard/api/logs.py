"""``GET /api/v1/services/{name}/logs`` (``deployment:read`` for the service): what the service's
replicas printed, from the region's runtime (``Runtime.read_logs``). Included by
``api.app.create_app``; ``shipyard logs`` (cli/logs.py) is its client.

Without ``follow``: one JSON document, the last ``tail`` lines (default 200, at most 10,000)
matching ``revision``/``replica``/``since``, oldest first, and a ``cursor``; pass it back as
``after`` to get only the lines written since. With ``follow=true``: NDJSON
(``application/x-ndjson``), one object per line. Records are ``{"type": "line", ...}``, then
after ``Settings.log_follow_max_seconds`` (an hour by default) one ``{"type": "end", "cursor"}``
the client resumes from (``shipyard logs --follow`` does, so a user sees one stream); an empty
line is a keep-alive, sent after ``KEEPALIVE_SECONDS`` without output, so proxies do not close
an idle stream. A client that goes away ends the stream at once (Starlette watches the
connection for the disconnect and cancels it; a write to a closed connection would end it too):
nothing is left polling (tests/api/test_logs.py checks it under the real uvicorn). A runtime
that fails mid-stream ends it with ``{"type": "error", "message"}``. The server polls the
runtime every ``POLL_SECONDS``, with the cursor: the agent reads only what was appended.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from shipyard.api import problems
from shipyard.api.auth import Claims, require_permission
from shipyard.api.context import AppContext
from shipyard.domain.log_queries import (
    CURSOR,
    DURATION,
    REPLICA_ID,
    REVISION,
    SINCE_HELP,
    format_cursor,
    parse_cursor,
    parse_since,
)
from shipyard.domain.models import DNS_LABEL
from shipyard.errors import NotFound, ShipyardError, UnknownRegion
from shipyard.runtime.base import MAX_LOG_LINES, LogBatch, LogLine, LogQuery

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 5.0
NDJSON = "application/x-ndjson"
#: The longest ``after`` accepted (a cursor names each replica of the service once).
MAX_CURSOR_CHARS = 65536

CanRead = Annotated[Claims, Depends(require_permission("deployment:read"))]


def _ctx(request: Request) -> AppContext:
    context: AppContext = request.app.state.context
    return context


Ctx = Annotated[AppContext, Depends(_ctx)]


class LogLineRead(BaseModel):
    """One line a replica printed (masked of every secret the agent knows)."""

    timestamp: str = Field(description="When the agent read it, ISO 8601 UTC.")
    replica_id: str
    revision: str
    stream: Literal["stdout", "stderr"]
    text: str


class LogsRead(BaseModel):
    service: str
    region: str
    lines: list[LogLineRead]
    cursor: str = Field(description="Pass as ?after= to get only the lines written since.")


def line_read(line: LogLine) -> dict[str, Any]:
    return {
        "timestamp": dt.datetime.fromtimestamp(line.timestamp, dt.UTC).isoformat(),
        "replica_id": line.replica_id,
        "revision": line.revision,
        "stream": line.stream,
        "text": line.text,
    }


def _service_name(name: str) -> str:
    if not re.fullmatch(DNS_LABEL, name):
        raise NotFound(f"{name!r} is not a service name (services are DNS labels)")
    return name


router = APIRouter()


@router.get(
    "/api/v1/services/{name}/logs",
    tags=["services"],
    response_model=LogsRead,
    responses={
        **problems.responses(404, 422, 401, 403, 413, 500, 503),
        200: {
            "description": "The lines (JSON), or with ?follow=true an NDJSON stream of them.",
            "content": {NDJSON: {"schema": {"type": "string"}}},
        },
    },
)
async def service_logs(
    name: Annotated[str, Depends(_service_name)],
    claims: CanRead,
    c: Ctx,
    region: Annotated[str, Query(pattern=DNS_LABEL)] = "local",
    revision: Annotated[str | None, Query(pattern=REVISION)] = None,
    replica: Annotated[str | None, Query(pattern=REPLICA_ID)] = None,
    tail: Annotated[int, Query(ge=0, le=MAX_LOG_LINES)] = 200,
    since: Annotated[
        str | None,
        Query(
            max_length=64,
            description=SINCE_HELP,
            # Replaces the schema FastAPI would write: a duration, or an RFC 3339 date-time
            # (``parse_since`` accepts every one), each a string of at most 64 characters.
            json_schema_extra={
                "anyOf": [
                    {"type": "string", "pattern": DURATION},
                    {"type": "string", "format": "date-time", "maxLength": 64},
                ]
            },
        ),
    ] = None,
    after: Annotated[
        str | None,
        Query(
            max_length=MAX_CURSOR_CHARS,
            pattern=CURSOR,
            description="A cursor from an earlier answer: only lines written since.",
        ),
    ] = None,
    follow: bool = False,
) -> Response:
    """The service's replica logs: stdout and stderr, also of replicas stopped since (the agent
    keeps the logs of a service's 5 latest revisions, 10 MiB x 3 per replica)."""
    claims.require("deployment:read", name)
    runtime = c.runtimes.get(region)
    if runtime is None:
        raise UnknownRegion(f"unknown region {region!r}; this server runs: {', '.join(c.runtimes)}")
    clock = c.pipeline.deps.clock
    query = LogQuery(
        revision=revision,
        replica_id=replica,
        tail=tail,
        since=parse_since(since, clock.now()) if since is not None else None,
        after=parse_cursor(after) if after is not None else None,
    )
    first = await runtime.read_logs(name, query)
    if not follow:
        return JSONResponse(
            {
                "service": name,
                "region": region,
                "lines": [line_read(line) for line in first.lines],
                "cursor": format_cursor(first.cursor),
            }
        )
    limit = c.settings.log_follow_max_seconds

    async def stream() -> AsyncIterator[bytes]:
        batch: LogBatch = first
        deadline = clock.now() + limit
        quiet_since = clock.now()
        while True:
            if batch.lines:
                quiet_since = clock.now()
                yield b"".join(_record({"type": "line", **line_read(x)}) for x in batch.lines)
            elif clock.now() - quiet_since >= KEEPALIVE_SECONDS:
                quiet_since = clock.now()
                yield b"\n"
            if clock.now() >= deadline:
                break
            await clock.sleep(POLL_SECONDS)
            try:
                batch = await runtime.read_logs(
                    name, replace(query, after=batch.cursor, tail=MAX_LOG_LINES)
                )
            except ShipyardError as exc:
                yield _record({"type": "error", "message": exc.message})
                return
        end = {"type": "end", "reason": "follow_limit", "cursor": format_cursor(batch.cursor)}
        yield _record(end)

    return StreamingResponse(stream(), media_type=NDJSON)


def _record(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"
