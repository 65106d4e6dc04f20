"""The delivery worker against a receiver (httpx's MockTransport): signed webhooks, Slack
lines, retries with backoff on an injected clock and jitter, giving up after max_attempts,
redirects not followed, and no credential in a log line or an error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random

import httpx
import pytest

from shipyard.audit import AuditEvent
from shipyard.audit.log import SqlAuditLog
from shipyard.notify import delivery, signing
from shipyard.notify.delivery import DeliveryWorker, backoff
from shipyard.notify.sinks import SinkService

from .conftest import SLACK_URL, WEBHOOK_SECRET, Now, slack, webhook


class Highest(random.Random):
    """Jitter that always picks the top of its range: the backoff's ceiling, predictably."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Receiver:
    """Answers each request with the next of ``statuses`` (then 200) and keeps what it got."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status = self.statuses.pop(0) if self.statuses else 200
        headers = {"location": "http://elsewhere.test/"} if 300 <= status < 400 else {}
        return httpx.Response(status, headers=headers)


def worker(sinks: SinkService, clock: Now, handler: object) -> DeliveryWorker:
    return DeliveryWorker(
        sinks.outbox,
        sinks,
        clock,
        replica_id="r1",
        transport=httpx.MockTransport(handler),  # type: ignore[arg-type]
        rng=Highest(),
    )


def failed_event() -> AuditEvent:
    return AuditEvent(
        event_type="deployment.failed",
        deployment_id="d1",
        service="web",
        region="local",
        user="alice",
        status="Failed",
    )


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (9, 256.0), (10, 300.0), (12, 300.0), (500, 300.0)],
)
def test_backoff_is_exponential_from_one_second_capped_at_five_minutes(
    attempt: int, ceiling: float
) -> None:
    assert backoff(attempt, Highest()) == ceiling
    jittered = backoff(attempt, random.Random(attempt))
    assert 0.0 <= jittered <= ceiling


async def test_a_webhook_gets_a_signed_body_it_can_verify(
    sinks: SinkService, audit: SqlAuditLog, clock: Now
) -> None:
    sinks.add(webhook(), "alice")  # type: ignore[arg-type]
    record = await audit.append(failed_event())
    receiver = Receiver()
    w = worker(sinks, clock, receiver)
    assert await w.deliver_due() == 1
    await w.aclose()
    (request,) = receiver.requests
    (row,) = sinks.outbox.rows()
    assert signing.verify(
        WEBHOOK_SECRET.encode(), dict(request.headers), request.content, now=clock.now()
    )
    assert request.headers["x-shipyard-event"] == "deployment.failed"
    assert request.headers["idempotency-key"] == row.key
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("shipyard/")
    assert json.loads(request.content)["audit"] == {"seq": record.seq, "hash": record.hash}
    assert (row.state, row.attempts, row.delivered_at) == ("delivered", 1, clock.now())


async def test_failures_are_retried_with_backoff_under_the_same_idempotency_key(
    sinks: SinkService, audit: SqlAuditLog, clock: Now
) -> None:
    sinks.add(webhook(), "alice")  # type: ignore[arg-type]
    await audit.append(failed_event())
    receiver = Receiver(503, 500)
    w = worker(sinks, clock, receiver)
    start = clock.now()
    assert await w.deliver_due() == 1  # attempt 1: 503, next after 1 s
    (row,) = sinks.outbox.rows()
    assert (row.state, row.attempts, row.last_error, row.next_attempt_at) == (
        "pending",
        1,
        "HTTP 503",
        start + 1.0,
    )
    clock.value = start + 0.9
    assert await w.deliver_due() == 0  # not due yet
    clock.value = start + 1.0
    assert await w.deliver_due() == 1  # attempt 2: 500, next after 2 s
    (row,) = sinks.outbox.rows()
    assert row.next_attempt_at == start + 1.0 + 2.0
    clock.value = start + 3.0
    assert await w.deliver_due() == 1  # attempt 3: delivered
    await w.aclose()
    (row,) = sinks.outbox.rows()
    assert (row.state, row.attempts) == ("delivered", 3)
    keys = {r.headers["idempotency-key"] for r in receiver.requests}
    stamps = [r.headers["x-shipyard-timestamp"] for r in receiver.requests]
    assert keys == {row.key} and len(receiver.requests) == 3
    assert stamps == [str(int(start)), str(int(start + 1)), str(int(start + 3))]


async def test_after_max_attempts_it_stays_failed(
    sinks: SinkService, audit: SqlAuditLog, clock: Now
) -> None:
    sinks.add(webhook(max_attempts=2), "alice")  # type: ignore[arg-type]
    await audit.append(failed_event())
    receiver = Receiver(500, 302, 200)  # a redirect is a failure: not followed
    w = worker(sinks, clock, receiver)
    await w.deliver_due()
    clock.value += 10
    await w.deliver_due()
    clock.value += 10_000
    assert await w.deliver_due() == 0
    await w.aclose()
    assert len(receiver.requests) == 2
    (shown,) = sinks.outbox.deliveries("d1")
    assert (shown.state, shown.attempts, shown.last_error) == ("failed", 2, "HTTP 302")


async def test_slack_gets_one_line_and_no_credential_is_logged(
    sinks: SinkService, audit: SqlAuditLog, clock: Now, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sinks.add(slack(), "alice")  # type: ignore[arg-type]
    sinks.add(webhook(url="http://down.test/hook"), "alice")  # type: ignore[arg-type]
    await audit.append(failed_event())

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down.test":
            raise httpx.ConnectError("connection refused to http://down.test/hook")
        return Receiver(500)(request)

    got: list[httpx.Request] = []

    def keep(request: httpx.Request) -> httpx.Response:
        got.append(request)
        return handler(request)

    w = worker(sinks, clock, keep)
    await w.deliver_due()
    await w.aclose()
    slack_request = next(r for r in got if r.url.host == "hooks.slack.test")
    assert str(slack_request.url) == SLACK_URL
    assert json.loads(slack_request.content) == {
        "text": "Shipyard: web (local) failed, status Failed, deployment d1"
    }
    assert "x-shipyard-signature" not in slack_request.headers
    errors = {d.sink: d.last_error for d in sinks.outbox.deliveries("d1")}
    assert errors == {"team": "HTTP 500", "hook": "connection failed (ConnectError)"}
    # httpx logs each request's URL at INFO; logs.configure_logging keeps it at WARNING+.
    logged = repr([r.__dict__ for r in caplog.records if r.name.startswith("shipyard")])
    assert "notify.retrying" in logged
    for secret in ("XyZsecretpath", WEBHOOK_SECRET, "down.test"):
        assert secret not in logged


async def test_a_removed_sinks_rows_fail_without_a_request(
    sinks: SinkService, audit: SqlAuditLog, clock: Now
) -> None:
    sinks.add(webhook(), "alice")  # type: ignore[arg-type]
    await audit.append(failed_event())
    sinks.remove("hook")
    receiver = Receiver()
    w = worker(sinks, clock, receiver)
    await w.deliver_due()
    await w.aclose()
    assert receiver.requests == []
    (shown,) = sinks.outbox.deliveries("d1")
    assert (shown.sink, shown.state, shown.last_error) == ("(removed)", "failed", "sink removed")


async def test_the_test_notification_is_signed_and_reports_a_failure(
    sinks: SinkService, clock: Now, monkeypatch: pytest.MonkeyPatch
) -> None:
    sinks.add(webhook(), "alice")  # type: ignore[arg-type]
    receiver = Receiver(200, 404)
    real = httpx.AsyncClient

    def client(**kw: object) -> httpx.AsyncClient:
        return real(transport=httpx.MockTransport(receiver), **kw)  # type: ignore[arg-type]

    monkeypatch.setattr("shipyard.notify.delivery.httpx.AsyncClient", client)
    assert await delivery.send_test(sinks, sinks.get("hook"), clock.now()) is None
    assert await delivery.send_test(sinks, sinks.get("hook"), clock.now()) == "HTTP 404"
    first = receiver.requests[0]
    assert first.headers["x-shipyard-event"] == "notification.test"
    assert signing.verify(
        WEBHOOK_SECRET.encode(), dict(first.headers), first.content, now=clock.now()
    )
    assert sinks.outbox.rows() == []  # outside the outbox


async def test_a_replica_starting_again_takes_back_its_previous_lifes_claims(
    sinks: SinkService, audit: SqlAuditLog, clock: Now
) -> None:
    """Killed mid-pass, a replica leaves rows claimed for a claim's length; started again under
    its id it lets them go first, so they go out at once. Another replica's claims stay."""
    sinks.add(webhook(), "alice")  # type: ignore[arg-type]
    await audit.append(failed_event())
    await audit.append(failed_event())
    first, second = sinks.outbox.rows()
    assert sinks.outbox.claim("r1:dead-life", clock.now(), 60.0, 1)[0].id == first.id
    assert sinks.outbox.claim("r10:other", clock.now(), 60.0, 1)[0].id == second.id
    receiver = Receiver()
    w = worker(sinks, clock, receiver)  # replica r1
    runs = asyncio.ensure_future(w.run())
    try:
        while not receiver.requests:
            await asyncio.sleep(0.01)
    finally:
        runs.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runs
        await w.aclose()
    assert [r.headers["idempotency-key"] for r in receiver.requests] == [first.key]
    assert [r.state for r in sinks.outbox.rows()] == ["delivered", "pending"]


async def test_the_retry_cap_bounds_the_wait(
    sinks: SinkService, audit: SqlAuditLog, clock: Now
) -> None:
    sinks.add(webhook(), "alice")  # type: ignore[arg-type]
    await audit.append(failed_event())
    w = DeliveryWorker(
        sinks.outbox,
        sinks,
        clock,
        replica_id="r1",
        transport=httpx.MockTransport(Receiver(*[500] * 8)),
        rng=Highest(),
        cap_seconds=5.0,
    )
    waits = []
    for _ in range(6):
        before = clock.now()
        await w.deliver_due()
        (row,) = sinks.outbox.rows()
        waits.append(row.next_attempt_at - before)
        clock.value = row.next_attempt_at
    await w.aclose()
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
