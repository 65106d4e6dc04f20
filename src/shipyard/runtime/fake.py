"""In-memory ``Runtime`` + ``TrafficRouter`` + ``Prober`` honouring the same contract as the local
agent (tests/runtime/test_contract.py runs one suite against both).

Used by orchestrator unit tests with a ``FakeClock`` (and ``health.fake.FakeProber``): injected
crashes and start failures, and a log of every weight change to assert invariants on.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from shipyard.errors import RevisionStartFailed, TrafficSwitchFailed
from shipyard.runtime.base import ReplicaStatus, RevisionSpec, ServiceState


@dataclass
class _Service:
    url: str
    weights: dict[str, int] = field(default_factory=dict)
    replicas: dict[str, ReplicaStatus] = field(default_factory=dict)


class FakeRouter:
    type = "fake"

    def __init__(self, runtime: FakeRuntime) -> None:
        self._rt = runtime
        #: Every accepted weight change, in order: (service, weights).
        self.history: list[tuple[str, dict[str, int]]] = []

    async def set_weight(self, service: str, weights: Mapping[str, int]) -> None:
        svc = self._rt.services.get(service)
        if svc is None:
            raise TrafficSwitchFailed(f"service {service} has no route")
        positive = {k: v for k, v in weights.items() if v > 0}
        if positive and sum(positive.values()) != 100:
            raise TrafficSwitchFailed(f"weights must sum to 100, got {sum(positive.values())}")
        for rev in positive:
            if not any(r.revision == rev and r.alive and r.routable for r in svc.replicas.values()):
                raise TrafficSwitchFailed(f"revision {rev} of {service} has no routable replica")
        svc.weights = positive
        self.history.append((service, dict(positive)))

    async def verify_weight(self, service: str, weights: Mapping[str, int]) -> bool | None:
        svc = self._rt.services.get(service)
        return svc is not None and svc.weights == {k: v for k, v in weights.items() if v > 0}

    async def remove_managed_routes(self, service: str) -> None:
        self._rt.services.pop(service, None)


class FakeRuntime:
    kind = "fake"

    def __init__(self, region: str = "local") -> None:
        self.region = region
        self.services: dict[str, _Service] = {}
        self.router = FakeRouter(self)
        self.fail_start: set[str] = set()
        self.started: list[str] = []
        self.stopped: list[str] = []
        self._ids = itertools.count(1)
        self._ports = itertools.count(20000)

    async def ensure_service(self, service: str) -> str:
        svc = self.services.setdefault(service, _Service(url=f"http://fake/{service}"))
        return svc.url

    async def start_revision(self, spec: RevisionSpec) -> list[ReplicaStatus]:
        if spec.revision in self.fail_start:
            raise RevisionStartFailed(f"cannot start {spec.argv[0]!r} for revision {spec.revision}")
        await self.ensure_service(spec.service)
        svc = self.services[spec.service]
        alive = [r for r in svc.replicas.values() if r.revision == spec.revision and r.alive]
        for _ in range(spec.replicas - len(alive)):
            rid = f"{spec.revision}-{next(self._ids)}"
            r = ReplicaStatus(rid, spec.revision, "127.0.0.1", next(self._ports), "running", False)
            svc.replicas[rid] = r
            alive.append(r)
            self.started.append(rid)
        return alive

    async def set_routable(self, service: str, replica_ids: Sequence[str], routable: bool) -> None:
        svc = self.services[service]
        for rid in replica_ids:
            svc.replicas[rid] = replace(svc.replicas[rid], routable=routable)

    async def stop_replicas(
        self, service: str, replica_ids: Sequence[str], *, drain_timeout: float = 30.0
    ) -> None:
        svc = self.services.get(service)
        if svc is None:
            return
        for rid in replica_ids:
            if svc.replicas.pop(rid, None) is not None:
                self.stopped.append(rid)

    async def stop_revision(
        self, service: str, revision: str, *, drain_timeout: float = 30.0
    ) -> None:
        svc = self.services.get(service)
        if svc is not None:
            ids = [rid for rid, r in svc.replicas.items() if r.revision == revision]
            await self.stop_replicas(service, ids)

    async def service_state(self, service: str) -> ServiceState | None:
        svc = self.services.get(service)
        if svc is None:
            return None
        return ServiceState(service, svc.url, dict(svc.weights), list(svc.replicas.values()))

    async def list_services(self) -> list[str]:
        return sorted(self.services)

    # --- test controls ---------------------------------------------------------------------------

    def crash(self, replica_id: str, exit_code: int = 1) -> None:
        for svc in self.services.values():
            if replica_id in svc.replicas:
                svc.replicas[replica_id] = replace(
                    svc.replicas[replica_id], state="crashed", exit_code=exit_code, routable=False
                )

    def running_revisions(self, service: str) -> set[str]:
        svc = self.services.get(service)
        return {r.revision for r in svc.replicas.values() if r.alive} if svc else set()
