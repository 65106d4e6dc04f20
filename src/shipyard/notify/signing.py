"""Signed webhooks, Stripe-style: what Shipyard sends and what a receiver checks.

Every webhook POST carries ``X-Shipyard-Timestamp`` (Unix seconds) and ``X-Shipyard-Signature:
v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`` keyed with the sink's secret. The timestamp is
inside the signature, so a receiver that rejects timestamps older than ``tolerance`` seconds
rejects replays of a captured request; ``Idempotency-Key`` (the outbox row, stable across
retries) lets it drop the duplicates at-least-once delivery brings.

``sign`` is called by the delivery worker (``notify/delivery.py``); ``verify`` is the check a
receiver runs, written to be copied: it needs only the standard library::

    import hashlib, hmac, time

    def verify(secret: bytes, headers, body: bytes, tolerance: int = 300) -> bool:
        ts = headers["X-Shipyard-Timestamp"]
        want = hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        sigs = [p[3:] for p in headers["X-Shipyard-Signature"].split(",") if p.startswith("v1=")]
        return abs(time.time() - int(ts)) <= tolerance and any(
            hmac.compare_digest(want, s) for s in sigs)
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

TIMESTAMP_HEADER = "X-Shipyard-Timestamp"
SIGNATURE_HEADER = "X-Shipyard-Signature"
EVENT_HEADER = "X-Shipyard-Event"
IDEMPOTENCY_HEADER = "Idempotency-Key"
DEFAULT_TOLERANCE_SECONDS = 300


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>.<body>"``."""
    return hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: bytes, timestamp: int, body: bytes) -> dict[str, str]:
    """The two headers that sign ``body`` at ``timestamp``."""
    return {
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: f"v1={signature(secret, timestamp, body)}",
    }


def verify(
    secret: bytes,
    headers: Mapping[str, str],
    body: bytes,
    tolerance: int = DEFAULT_TOLERANCE_SECONDS,
    *,
    now: float | None = None,
) -> bool:
    """Whether ``headers`` sign ``body`` with ``secret`` and the timestamp is within
    ``tolerance`` seconds of ``now`` (default: the time). Header names case-insensitive; any
    of several ``v1=`` signatures (a receiver rotating keys) may match."""
    lowered = {k.lower(): v for k, v in headers.items()}
    ts = lowered.get(TIMESTAMP_HEADER.lower(), "")
    header = lowered.get(SIGNATURE_HEADER.lower(), "")
    if not ts.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(ts)) > tolerance:
        return False
    want = signature(secret, int(ts), body)
    given = [p.strip()[3:] for p in header.split(",") if p.strip().startswith("v1=")]
    return any(hmac.compare_digest(want, s) for s in given)
