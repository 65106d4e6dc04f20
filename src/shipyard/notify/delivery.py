"""The delivery worker: sends the outbox's notifications, at least once, never in a deployment's
path.

Every control-plane replica runs one (``api/context.py`` starts it as a task of its own; the
deployments only ever insert outbox rows, in their audit transaction). A pass claims due rows
(``OutboxStore.claim``: ``claimed_until`` keeps two replicas from sending one row at once, and
a dead replica's claims expire after ``claim_seconds``), POSTs each, and records the outcome
(only while its claim holds). A 2xx is delivered; anything else (another status, a timeout, a
refused connection, a sink whose key no longer opens) is a failed attempt, tried again after
an exponential backoff with full jitter (``backoff``: uniform in ``[0, min(cap, base *
2**(attempt-1))]``, 1 s base, 5 min cap: AWS's "full jitter", which spreads a fleet of retries
best) until the row's ``max_attempts``; then ``failed``, and it stays visible in
``GET /deployments/{id}``. A row whose sink was removed fails at once.

Webhooks get the body signed (``notify/signing.py``) with ``X-Shipyard-Event``,
``Idempotency-Key`` (the row's key) and ``X-Shipyard-Timestamp`` (each attempt's own); Slack
gets ``{"text": ...}``. Redirects are not followed (a 3xx is a failure: a redirect would take
the signed body somewhere the sink's owner did not name). Log lines name the sink and the
event, never a URL (a Slack URL is a credential) or a key; errors are the exception's type or
the status code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from typing import Any

import httpx

from shipyard import __version__
from shipyard.domain.clock import Clock, to_thread
from shipyard.errors import ShipyardError
from shipyard.logs import log_event
from shipyard.notify import events, signing
from shipyard.notify.sinks import SinkService
from shipyard.store.outbox import OutboxRow, OutboxStore, SinkRow

log = logging.getLogger("shipyard.notify.delivery")

BASE_SECONDS = 1.0
CAP_SECONDS = 300.0
#: A claim lasts this long: well past one POST's timeout, so a live worker never loses one.
CLAIM_SECONDS = 60.0
POLL_SECONDS = 1.0
TIMEOUT_SECONDS = 10.0
BATCH = 20


def backoff(
    attempt: int, rng: random.Random, base: float = BASE_SECONDS, cap: float = CAP_SECONDS
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1, 2, ...): full jitter."""
    return rng.uniform(0.0, min(cap, base * 2.0 ** min(attempt - 1, 30)))


class DeliveryWorker:
    """One replica's sender (module docstring). ``transport``: httpx's (tests hand in a mock);
    ``rng``: the jitter's source."""

    def __init__(
        self,
        outbox: OutboxStore,
        sinks: SinkService,
        clock: Clock,
        *,
        replica_id: str,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        cap_seconds: float = CAP_SECONDS,
        poll_seconds: float = POLL_SECONDS,
        claim_seconds: float = CLAIM_SECONDS,
        timeout_seconds: float = TIMEOUT_SECONDS,
    ) -> None:
        self.outbox = outbox
        self.sinks = sinks
        self.clock = clock
        # A token of its own per worker: a replica restarted under the same id does not
        # inherit its previous life's claims (they expire).
        self.replica = f"{replica_id[:40]}:"
        self.worker = f"{self.replica}{uuid.uuid4().hex[:16]}"
        self._rng = rng or random.SystemRandom()
        self._poll = poll_seconds
        self._claim = claim_seconds
        self._cap = cap_seconds
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=timeout_seconds,
            follow_redirects=False,
            trust_env=False,
            headers={"user-agent": f"shipyard/{__version__}"},
        )
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Run a pass soon (a sink test, an event this replica just wrote)."""
        self._wake.set()

    async def run(self) -> None:
        """Passes until cancelled; a pass that fails (the database away) is logged and the
        next one tries again. First, the claims of this replica's previous life (killed in the
        middle of a pass) are let go: its rows go out now, not a claim's length later."""
        try:
            await to_thread(self.outbox.release_claims, self.replica)
        except Exception as exc:  # they expire anyway
            log_event(log, "notify.release_failed", level=logging.ERROR, error=type(exc).__name__)
        while True:
            try:
                await self.deliver_due()
            except Exception as exc:  # the worker must outlive a database hiccup
                log_event(log, "notify.pass_failed", level=logging.ERROR, error=type(exc).__name__)
            sleep = asyncio.ensure_future(self.clock.sleep(self._poll))
            wake = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleep, wake}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sleep, wake):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self._wake.clear()

    async def deliver_due(self) -> int:
        """One pass: claim the due rows and send them; how many were claimed."""
        rows = await to_thread(self.outbox.claim, self.worker, self.clock.now(), self._claim, BATCH)
        if not rows:
            return 0
        sinks = await to_thread(self.outbox.sinks_by_id, sorted({r.sink_id for r in rows}))
        await asyncio.gather(*(self._deliver(r, sinks.get(r.sink_id)) for r in rows))
        return len(rows)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _deliver(self, row: OutboxRow, sink: SinkRow | None) -> None:
        attempt = row.attempts + 1
        if sink is None:
            await to_thread(
                self.outbox.mark_attempt_failed, row.id, self.worker, "sink removed", retry_at=None
            )
            log_event(
                log,
                "notify.failed",
                level=logging.ERROR,
                error="sink removed",
                notification_event=row.event,
                notification=row.key,
            )
            return
        error = await self._send(row, sink)
        fields: dict[str, Any] = {
            "sink": sink.name,
            "notification_event": row.event,
            "notification": row.key,
            "attempt": attempt,
        }
        if error is None:
            await to_thread(self.outbox.mark_delivered, row.id, self.worker, self.clock.now())
            log_event(log, "notify.delivered", **fields)
            return
        if attempt >= row.max_attempts:
            await to_thread(
                self.outbox.mark_attempt_failed, row.id, self.worker, error, retry_at=None
            )
            log_event(log, "notify.failed", level=logging.ERROR, error=error, **fields)
            return
        delay = backoff(attempt, self._rng, cap=self._cap)
        await to_thread(
            self.outbox.mark_attempt_failed,
            row.id,
            self.worker,
            error,
            retry_at=self.clock.now() + delay,
        )
        log_event(
            log,
            "notify.retrying",
            level=logging.WARNING,
            error=error,
            retry_in_seconds=round(delay, 3),
            **fields,
        )

    async def _send(self, row: OutboxRow, sink: SinkRow) -> str | None:
        """POST ``row`` to ``sink``: None when delivered, else what went wrong (no URL)."""
        try:
            url = self.sinks.target(sink)
            content, headers = request_for(
                row, sink, self.sinks.secret(sink), int(self.clock.now())
            )
        except ShipyardError as exc:
            return f"cannot open the sink's credentials: {exc.code}"
        return await post(self._client, url, content, headers)


def request_for(
    row: OutboxRow, sink: SinkRow, secret: bytes | None, timestamp: int
) -> tuple[bytes, dict[str, str]]:
    """The body and headers of ``row``'s POST to ``sink``."""
    headers = {
        "content-type": "application/json",
        signing.EVENT_HEADER: row.event,
        signing.IDEMPOTENCY_HEADER: row.key,
    }
    if sink.kind == "slack":
        text = events.slack_text(row.event, json.loads(row.body))
        return json.dumps({"text": text}).encode(), headers
    content = row.body.encode()
    if secret is not None:
        headers.update(signing.sign(secret, timestamp, content))
    return content, headers


async def post(
    client: httpx.AsyncClient, url: str, content: bytes, headers: dict[str, str]
) -> str | None:
    """One POST: None on a 2xx, else ``HTTP <status>`` or the failure's kind (never the URL:
    httpx's messages may carry it)."""
    try:
        response = await client.post(url, content=content, headers=headers)
    except httpx.TimeoutException:
        return "timeout"
    except httpx.HTTPError as exc:
        return f"connection failed ({type(exc).__name__})"
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code}"


TEST_EVENT = "notification.test"


async def send_test(sinks: SinkService, sink: SinkRow, now: float) -> str | None:
    """POST one test notification to ``sink`` now, outside the outbox (``shipyard
    notifications test``): None when it answered 2xx, else what went wrong."""
    row = OutboxRow(
        id=0,
        key=str(uuid.uuid4()),
        sink_id=sink.id,
        event=TEST_EVENT,
        audit_seq=None,
        deployment_id=None,
        body=json.dumps({"event": TEST_EVENT, "sink": sink.name, "occurred_at": now}),
        state="pending",
        attempts=0,
        max_attempts=1,
        next_attempt_at=now,
        claimed_by=None,
        claimed_until=None,
        last_error=None,
        created_at=now,
        delivered_at=None,
    )
    try:
        url = sinks.target(sink)
        content, headers = request_for(row, sink, sinks.secret(sink), int(now))
    except ShipyardError as exc:
        return f"cannot open the sink's credentials: {exc.code}"
    async with httpx.AsyncClient(
        timeout=TIMEOUT_SECONDS,
        follow_redirects=False,
        trust_env=False,
        headers={"user-agent": f"shipyard/{__version__}"},
    ) as client:
        return await post(client, url, content, headers)
