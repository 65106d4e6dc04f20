"""``FakeProber``: the ``Prober`` contract without sockets, for the orchestrator's and the API's
tests (``health.probing.HttpProber`` is the real one).

Two ways to say what a replica's health endpoint does:

- ``answers[replica_id]``: an HTTP status it answers, ``"refused"`` (nothing listens) or
  ``"timeout"`` (it never answers). The prober turns that into the ``ProbeResult`` the real
  prober gives for the same endpoint (tests/contract/test_prober_contract.py runs one suite
  against both, the real one against real sockets);
- ``scripts[revision]``: ``(replica, probe number) -> healthy?``, for answers that change from one
  probe to the next (healthy is a 200, unhealthy a 500).

A replica named in neither answers 200.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from shipyard.domain.models import HEALTH_CHECK_TIMEOUT_MS, HealthCheck
from shipyard.health.probing import Outcome, ProbeResult
from shipyard.runtime.base import ReplicaStatus

HealthScript = Callable[[ReplicaStatus, int], bool]
"""(replica, probe number for that replica, from 1) -> healthy?"""

#: What a health endpoint does: answers this HTTP status, refuses the connection, or never answers.
Answer = int | Literal["refused", "timeout"]


class FakeProber:
    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.scripts: dict[str, HealthScript] = {}
        #: Probes so far, per replica id.
        self.counts: dict[str, int] = {}

    async def __call__(self, replica: ReplicaStatus, check: HealthCheck) -> ProbeResult:
        n = self.counts.get(replica.replica_id, 0) + 1
        self.counts[replica.replica_id] = n
        answer = self.answers.get(replica.replica_id)
        if answer is None:
            script = self.scripts.get(replica.revision)
            answer = 200 if script is None or script(replica, n) else 500
        return result_for(answer, check)


def result_for(answer: Answer, check: HealthCheck) -> ProbeResult:
    """What ``HttpProber`` reports for an endpoint that behaves as ``answer`` (its details
    included, where they are ours rather than the HTTP library's)."""
    if answer == "refused":
        return ProbeResult(Outcome.REFUSED, detail="connection refused")
    if answer == "timeout":
        timeout = min(check.timeout_seconds, HEALTH_CHECK_TIMEOUT_MS / 1000)
        return ProbeResult(Outcome.TIMEOUT, detail=f"no answer within {timeout:g}s")
    ok = 200 <= answer < 300
    return ProbeResult(Outcome.OK if ok else Outcome.FAIL, answer, 0.0, f"HTTP {answer}")
