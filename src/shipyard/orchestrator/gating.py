"""Asking a ``[[gates]]`` webhook: POST the deployment's summary, read the status code.

``ask`` is the one HTTP call (``httpx``, in a worker thread through ``domain.clock.to_thread``:
fake time does not move while a receiver thinks, so a test's gate answers at a known moment);
``summary`` is the JSON body. Called by the ``CallGate`` executor (``steps/gates.py``), once per
ask.

The request: ``content-type: application/json``, ``user-agent: shipyard/<version>``, an
``Idempotency-Key`` of the deployment id and the gate's name (the same for every ask of that gate
in that deployment: a receiver that counts approvals counts a control plane's restart once),
``timeout_seconds`` for each phase (connect, write, read), no redirects followed (a 3xx is not a
2xx). Only the status code is read; the body is closed unread. The URL is never logged or
audited whole (its path may carry a token): ``host`` is what records show.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from shipyard import __version__
from shipyard.domain.clock import to_thread
from shipyard.domain.release import GateSpec
from shipyard.orchestrator.record import Record
from shipyard.strategies.steps import CallGate

USER_AGENT = f"shipyard/{__version__}"


@dataclass(frozen=True)
class Answer:
    """What one ask got: a status code, or no answer (``timed_out``, or ``error``: the
    receiver could not be reached)."""

    status_code: int | None
    duration_ms: int
    timed_out: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def said(self) -> str:
        """``503``, ``timeout`` or ``unreachable``: what records and messages show."""
        if self.status_code is not None:
            return str(self.status_code)
        return "timeout" if self.timed_out else "unreachable"

    def detail(self) -> dict[str, Any]:
        """The answer as a stage and an audit record show it (never the URL or the body)."""
        out: dict[str, Any] = {"duration_ms": self.duration_ms}
        if self.status_code is not None:
            out["status_code"] = self.status_code
        elif self.timed_out:
            out["timeout"] = True
        else:
            out["unreachable"] = self.error or "connection failed"
        return out


def host(url: str) -> str:
    """The gate URL's host (and port when given): what the records name it by."""
    parts = urlsplit(url)
    return parts.netloc.rpartition("@")[2] or "?"


def idempotency_key(record: Record, gate: str) -> str:
    return f"{record.id}:{gate}"


def summary(record: Record, step: CallGate) -> dict[str, Any]:
    """The JSON body: the deployment as a change-management system wants it."""
    plan = record.progress.plan
    return {
        "id": record.id,
        "service": record.service,
        "region": record.region,
        "regions": record.all_regions,
        "revision": record.green_revision,
        "stable_revision": record.blue_revision,
        "strategy": record.strategy.model_dump(mode="json"),
        "status": record.status.value,
        "step": record.progress.step,
        "steps": len(plan.steps) if plan is not None else 0,
        "gate": {"name": step.gate, "at": step.at},
        "trace_id": record.trace_id,
        "created_at": record.created_at.isoformat(),
        "requested_by": record.triggered_by,
    }


async def ask(record: Record, step: CallGate, gate: GateSpec) -> Answer:
    """POST the summary to ``gate.url`` once (see the module docstring)."""
    body = json.dumps(summary(record, step)).encode()
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "idempotency-key": idempotency_key(record, step.gate),
    }
    return await to_thread(_post, gate.url, body, headers, gate.timeout_seconds)


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> Answer:
    started = time.perf_counter()

    def took() -> int:
        return int((time.perf_counter() - started) * 1000)

    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client,
            client.stream("POST", url, content=body, headers=headers) as response,
        ):
            return Answer(status_code=response.status_code, duration_ms=took())
    except httpx.TimeoutException:
        return Answer(status_code=None, duration_ms=took(), timed_out=True)
    except httpx.HTTPError as exc:
        # The class name only: a message may repeat the URL, and its path may be a token.
        return Answer(status_code=None, duration_ms=took(), error=type(exc).__name__)
