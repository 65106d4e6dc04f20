"""``GET /api/v1/services/{name}/logs`` in-process over the real pipeline on the fake runtime: the
lines and a cursor that returns only what came after, the permission (``deployment:read`` for
the service), bad input refused with a problem saying what is accepted, and ``follow=true`` as
an NDJSON stream that sees lines printed while it runs and ends with a cursor to resume from."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import httpx
import pytest

from shipyard.api.app import create_app
from shipyard.domain.log_queries import format_cursor, parse_cursor, parse_since
from shipyard.runtime.base import LogBatch, LogQuery
from tests.api.live import LiveServer
from tests.api.test_api import ALL, Harness, body


async def _deployed(client: httpx.AsyncClient, h: Harness) -> str:
    """Deploy ``api``; the id of its one replica."""
    r = await client.post("/api/v1/deploy?wait=true", json=body(), headers=h.headers())
    assert r.status_code == 200, r.text
    [replica] = h.runtime.services["api"].replicas
    return replica


async def test_lines_come_with_stream_replica_revision_and_time_and_a_cursor(
    client: httpx.AsyncClient, h: Harness
) -> None:
    rid = await _deployed(client, h)
    h.runtime.print(rid, "listening on :8000")
    h.runtime.print(rid, "Traceback (most recent call last):", "stderr")
    r = await client.get("/api/v1/services/api/logs", headers=h.headers("deployment:read"))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert [(x["stream"], x["text"]) for x in doc["lines"]] == [
        ("stdout", "listening on :8000"),
        ("stderr", "Traceback (most recent call last):"),
    ]
    revision = h.runtime.services["api"].replicas[rid].revision
    assert {(x["replica_id"], x["revision"]) for x in doc["lines"]} == {(rid, revision)}
    assert doc["lines"][0]["timestamp"].startswith("2023-11-14T")  # the fake clock's epoch
    h.runtime.print(rid, "GET / 200")
    r = await client.get(
        "/api/v1/services/api/logs",
        params={"after": doc["cursor"], "revision": revision, "replica": rid},
        headers=h.headers("deployment:read"),
    )
    assert [x["text"] for x in r.json()["lines"]] == ["GET / 200"]
    r = await client.get(
        "/api/v1/services/api/logs", params={"tail": 1}, headers=h.headers("deployment:read")
    )
    assert [x["text"] for x in r.json()["lines"]] == ["GET / 200"]


async def test_since_takes_a_duration_or_a_time(client: httpx.AsyncClient, h: Harness) -> None:
    rid = await _deployed(client, h)
    h.runtime.print(rid, "old")
    h.clock.advance(3600)
    h.runtime.print(rid, "new")
    for since in ("10m", "2023-11-14T23:00:00Z", "2023-11-14t23:00:00.1234567z", "59m"):
        r = await client.get(
            "/api/v1/services/api/logs",
            params={"since": since},
            headers=h.headers("deployment:read"),
        )
        assert [x["text"] for x in r.json()["lines"]] == ["new"], since


@pytest.mark.parametrize(
    "token", [["deployment:create", "deployment:rollback"], ["deployment:read:web"]]
)
async def test_reading_logs_needs_deployment_read_for_the_service(
    client: httpx.AsyncClient, h: Harness, token: list[str]
) -> None:
    await _deployed(client, h)
    r = await client.get("/api/v1/services/api/logs", headers=h.headers(*token))
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "insufficient_permissions"
    r = await client.get("/api/v1/services/api/logs", headers=h.headers("deployment:read:api"))
    assert r.status_code == 200, r.text
    assert (await client.get("/api/v1/services/api/logs")).status_code == 401


@pytest.mark.parametrize(
    ("params", "status", "says"),
    [
        pytest.param({"tail": -1}, 422, "tail", id="negative-tail"),
        pytest.param({"tail": 10_001}, 422, "tail", id="tail-too-large"),
        pytest.param({"tail": "many"}, 422, "tail", id="tail-not-a-number"),
        pytest.param({"since": "yesterday"}, 422, "a duration before now", id="since-words"),
        pytest.param({"since": "10 minutes"}, 422, "ISO 8601", id="since-spaces"),
        pytest.param({"revision": "../etc"}, 422, "revision", id="revision-path"),
        pytest.param({"replica": "a b"}, 422, "replica", id="replica-space"),
        pytest.param({"after": "not-a-cursor!"}, 422, "after", id="after-garbage"),
        pytest.param({"after": "r1-1:-5"}, 422, "after", id="after-negative"),
        pytest.param({"region": "mars"}, 422, "region", id="unknown-region"),
        pytest.param({"revision": "nope"}, 404, "revision nope", id="unknown-revision"),
        pytest.param({"replica": "nope-1"}, 404, "replica nope-1", id="unknown-replica"),
    ],
)
async def test_bad_input_gets_a_problem_saying_what_is_wrong(
    client: httpx.AsyncClient, h: Harness, params: dict[str, Any], status: int, says: str
) -> None:
    await _deployed(client, h)
    r = await client.get("/api/v1/services/api/logs", params=params, headers=h.headers(*ALL))
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert says in r.text


async def test_an_unknown_service_is_404(client: httpx.AsyncClient, h: Harness) -> None:
    for name in ("ghost", "Not_A_Label"):
        r = await client.get(f"/api/v1/services/{name}/logs", headers=h.headers(*ALL))
        assert r.status_code == 404, r.text


async def test_follow_streams_new_lines_as_ndjson_and_ends_with_a_cursor(
    client: httpx.AsyncClient, h: Harness
) -> None:
    rid = await _deployed(client, h)
    h.runtime.print(rid, "before")

    async def app_prints_later() -> None:
        await h.clock.sleep(1.0)  # while the stream is open (it lasts 2 s of the fake clock)
        h.runtime.print(rid, "during", "stderr")

    printer = asyncio.create_task(app_prints_later())
    r = await client.get(
        "/api/v1/services/api/logs", params={"follow": "true"}, headers=h.headers(*ALL)
    )
    await printer
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/x-ndjson"
    records = [json.loads(x) for x in r.text.splitlines() if x]
    assert [(x["type"], x.get("text")) for x in records] == [
        ("line", "before"),
        ("line", "during"),
        ("end", None),
    ]
    assert records[1]["stream"] == "stderr"
    # Resuming from the end record's cursor gives what was printed after the stream ended.
    h.runtime.print(rid, "after")
    r = await client.get(
        "/api/v1/services/api/logs",
        params={"after": records[-1]["cursor"]},
        headers=h.headers(*ALL),
    )
    assert [x["text"] for x in r.json()["lines"]] == ["after"]


async def test_a_quiet_follow_sends_keepalives(h: Harness) -> None:
    h.settings = h.settings.model_copy(update={"log_follow_max_seconds": 12.0})
    app = create_app(h.settings, context_factory=h.context)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shipyard") as c:
            await _deployed(c, h)
            r = await c.get(
                "/api/v1/services/api/logs", params={"follow": "true"}, headers=h.headers(*ALL)
            )
    parts = r.text.split("\n")
    assert parts.count("") >= 2 + 1  # two keep-alives in 12 quiet seconds, and the final newline
    assert json.loads(parts[-2])["type"] == "end"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("90s", 1_000_000.0 - 90, id="seconds"),
        pytest.param("2h", 1_000_000.0 - 7200, id="hours"),
        pytest.param("1970-01-02T00:00:00Z", 86400.0, id="utc"),
        pytest.param("1970-01-02T00:00:00", 86400.0, id="naive-is-utc"),
        pytest.param("1970-01-02T01:00:00+01:00", 86400.0, id="offset"),
        pytest.param("1970-01-01t23:59:60z", 86399.0, id="leap-second-lower-case"),
        pytest.param("0001-01-01T00:00:00+23:59", -62135596800.0 - 86340, id="before-year-one-utc"),
    ],
)
def test_since_accepts_every_rfc3339_time(text: str, expected: float) -> None:
    assert parse_since(text, 1_000_000.0) == pytest.approx(expected)


def test_a_cursor_reads_back_as_it_was_written() -> None:
    cursor = {"v1-1-abcd": 0, "v2-10-ef01": 123_456_789_012}
    assert parse_cursor(format_cursor(cursor)) == cursor
    assert parse_cursor("") == {}


def test_a_follower_that_goes_away_ends_its_stream(h: Harness) -> None:
    """Under the real uvicorn: once the client disconnects, the stream (which would otherwise
    run for days of the fake clock) ends, and with it the polling of the runtime."""
    h.settings = h.settings.model_copy(update={"log_follow_max_seconds": 1e6})
    app = create_app(h.settings, context_factory=h.context)
    ended = threading.Event()

    async def watched(scope: Any, receive: Any, send: Any) -> None:
        try:
            await app(scope, receive, send)
        finally:
            if scope["type"] == "http" and scope["path"].endswith("/logs"):
                ended.set()

    polls: list[int] = []
    read_logs = h.runtime.read_logs

    async def counted(service: str, query: LogQuery) -> LogBatch:
        polls.append(1)
        return await read_logs(service, query)

    h.runtime.read_logs = counted  # type: ignore[method-assign]
    headers = h.headers(*ALL)
    with LiveServer(watched, h.settings) as port:
        base = f"http://127.0.0.1:{port}"
        r = httpx.post(f"{base}/api/v1/deploy?wait=true", json=body(), headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        [rid] = h.runtime.services["api"].replicas
        h.runtime.print(rid, "hello")
        with httpx.stream("GET", f"{base}/api/v1/services/api/logs?follow=true",
                          headers=headers, timeout=60) as stream:  # fmt: skip
            first = next(line for line in stream.iter_lines() if line)
            assert json.loads(first)["text"] == "hello"
        assert ended.wait(60), "the stream outlived its client"
        after = len(polls)
        assert after < 1e6 / 0.5  # it ended long before its follow limit
        r = httpx.get(f"{base}/healthz", timeout=10)  # the server is still well
        assert r.status_code == 200
    assert len(polls) == after  # nothing polled once the stream ended
