"""A scripted ``Prober`` for orchestrator tests: no sockets, health decided per revision."""

from __future__ import annotations

from collections.abc import Callable

from shipyard.domain.models import HealthCheck
from shipyard.health.probing import Outcome, ProbeResult
from shipyard.runtime.base import ReplicaStatus

HealthScript = Callable[[ReplicaStatus, int], bool]
"""(replica, probe number for that replica, from 1) -> healthy?"""


class FakeProber:
    def __init__(self) -> None:
        self.scripts: dict[str, HealthScript] = {}
        self.counts: dict[str, int] = {}

    async def __call__(self, replica: ReplicaStatus, check: HealthCheck) -> ProbeResult:
        n = self.counts.get(replica.replica_id, 0) + 1
        self.counts[replica.replica_id] = n
        script = self.scripts.get(replica.revision)
        ok = True if script is None else script(replica, n)
        return ProbeResult(Outcome.OK if ok else Outcome.FAIL, 200 if ok else 500)
