"""In-memory ``Runtime`` + ``TrafficRouter`` + ``Prober`` honouring the same contract as the local
agent (tests/contract/test_runtime_contract.py runs one suite against both).

Used by orchestrator unit tests with a ``FakeClock`` (and ``health.fake.FakeProber``): injected
crashes (``crash``: the replica stays down; ``kill_replica``: it is restarted after a backoff on
the injected clock, as the agent's supervisor does) and start failures, a log of every weight
change and of every replica count change to assert invariants on, and a scripted metrics source
for canary analysis: a steady synthetic load (``FakeRouter.rps`` requests per second of the
injected clock, split by the weights in force) where each revision answers per its
``TrafficProfile`` (5xx rate, latency).
"""

from __future__ import annotations

import itertools
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from shipyard.errors import RevisionStartFailed, ShipyardError, TrafficSwitchFailed
from shipyard.routing.metrics import BUCKET_BOUNDS_MS, RevisionMetrics
from shipyard.runtime.base import ReplicaStatus, RevisionSpec, ServiceState, StickyKey


@dataclass
class _Service:
    url: str
    weights: dict[str, int] = field(default_factory=dict)
    replicas: dict[str, ReplicaStatus] = field(default_factory=dict)


@dataclass(frozen=True)
class TrafficProfile:
    """How a revision answers the synthetic load: share of 5xx and a fixed latency."""

    error_rate: float = 0.0
    latency_ms: float = 2.0


@dataclass
class _Served:
    requests: float = 0.0
    errors: float = 0.0
    latency_ms: dict[float, float] = field(default_factory=dict)


class FakeRouter:
    type = "fake"

    def __init__(self, runtime: FakeRuntime) -> None:
        self._rt = runtime
        #: Every accepted weight change, in order: (service, weights).
        self.history: list[tuple[str, dict[str, int]]] = []
        #: The sticky key in force per service (None: not sticky).
        self.sticky: dict[str, StickyKey | None] = {}
        #: Synthetic load through every service, requests per second of the runtime's clock.
        self.rps = 0.0
        self.profiles: dict[str, TrafficProfile] = {}
        #: When set, ``metrics`` raises it (metrics unavailable).
        self.metrics_error: ShipyardError | None = None
        self.metrics_calls = 0
        self._served: dict[str, dict[str, _Served]] = {}
        self._last: dict[str, float] = {}

    def _accrue(self, service: str) -> None:
        """Count the synthetic requests served since the last look, at the weights in force."""
        now = self._rt.now()
        svc = self._rt.services.get(service)
        last = self._last.get(service, now)
        self._last[service] = now
        if svc is None or now <= last or not self.rps:
            return
        served = self._served.setdefault(service, {})
        for rev, weight in svc.weights.items():
            n = self.rps * (now - last) * weight / 100
            profile = self.profiles.get(rev, TrafficProfile())
            s = served.setdefault(rev, _Served())
            s.requests += n
            s.errors += n * profile.error_rate
            s.latency_ms[profile.latency_ms] = s.latency_ms.get(profile.latency_ms, 0.0) + n

    async def metrics(self, service: str) -> Mapping[str, Mapping[str, Any]]:
        self.metrics_calls += 1
        if self.metrics_error is not None:
            raise self.metrics_error
        self._accrue(service)
        out: dict[str, Mapping[str, Any]] = {}
        for rev, s in self._served.get(service, {}).items():
            buckets = [0] * len(BUCKET_BOUNDS_MS)
            for latency, n in s.latency_ms.items():
                buckets[bisect_left(BUCKET_BOUNDS_MS, latency)] += int(n)
            requests = sum(buckets)
            errors = min(requests, int(s.errors))
            out[rev] = RevisionMetrics(
                revision=rev,
                requests=requests,
                status_2xx=requests - errors,
                status_5xx=errors,
                latency_buckets=tuple(buckets),
                latency_sum_ms=sum(lat * int(n) for lat, n in s.latency_ms.items()),
            ).to_dict()
        return out

    async def set_weight(
        self, service: str, weights: Mapping[str, int], *, sticky: StickyKey | None = None
    ) -> None:
        self._accrue(service)
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
        self.sticky[service] = sticky
        for rev in positive:  # like the real router: counters exist once a revision is routed
            self._served.setdefault(service, {}).setdefault(rev, _Served())
        self.history.append((service, dict(positive)))

    async def verify_weight(self, service: str, weights: Mapping[str, int]) -> bool | None:
        svc = self._rt.services.get(service)
        return svc is not None and svc.weights == {k: v for k, v in weights.items() if v > 0}

    async def remove_managed_routes(self, service: str) -> None:
        self._rt.services.pop(service, None)


@dataclass
class _PendingRestart:
    service: str
    due: float
    #: Whether the replica was routable before it died (set_routable(False) clears it).
    routable: bool


class FakeRuntime:
    kind = "fake"

    def __init__(
        self,
        region: str = "local",
        now: Callable[[], float] | None = None,
        *,
        restart_delay: float = 0.5,
        restart_delay_max: float = 30.0,
    ) -> None:
        self.region = region
        #: The clock the synthetic load runs on (a FakeClock's ``now`` in tests).
        self.now = now or time.monotonic
        self.services: dict[str, _Service] = {}
        self.router = FakeRouter(self)
        self.fail_start: set[str] = set()
        self.started: list[str] = []
        self.stopped: list[str] = []
        #: (service, running, ready) after every replica change: rolling invariants are
        #: asserted on this.
        self.observations: list[tuple[str, int, int]] = []
        #: The agent's backoff for ``kill_replica``: ``restart_delay`` doubling with every kill
        #: of the same replica, at most ``restart_delay_max`` (seconds of ``now``; the agent's
        #: reset after a long run is not modelled).
        self.restart_delay = restart_delay
        self.restart_delay_max = restart_delay_max
        #: Replica ids in the order they were restarted.
        self.restarted: list[str] = []
        self._pending: dict[str, _PendingRestart] = {}
        self._kills: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._ports = itertools.count(20000)

    async def ensure_service(self, service: str) -> str:
        svc = self.services.setdefault(service, _Service(url=f"http://fake/{service}"))
        return svc.url

    async def start_revision(self, spec: RevisionSpec) -> list[ReplicaStatus]:
        if spec.revision in self.fail_start:
            raise RevisionStartFailed(f"cannot start {spec.argv[0]!r} for revision {spec.revision}")
        await self.ensure_service(spec.service)
        self._restart_due(spec.service)
        svc = self.services[spec.service]
        # Like the agent: a replica waiting for its restart still counts.
        alive = [
            r
            for r in svc.replicas.values()
            if r.revision == spec.revision and (r.alive or r.replica_id in self._pending)
        ]
        for _ in range(spec.replicas - len(alive)):
            rid = f"{spec.revision}-{next(self._ids)}"
            r = ReplicaStatus(rid, spec.revision, "127.0.0.1", next(self._ports), "running", False)
            svc.replicas[rid] = r
            alive.append(r)
            self.started.append(rid)
            self._observe(spec.service)
        return alive

    def _observe(self, service: str) -> None:
        svc = self.services[service]
        running = sum(1 for r in svc.replicas.values() if r.alive)
        ready = sum(1 for r in svc.replicas.values() if r.alive and r.routable)
        self.observations.append((service, running, ready))

    async def set_routable(self, service: str, replica_ids: Sequence[str], routable: bool) -> None:
        svc = self.services[service]
        for rid in replica_ids:
            svc.replicas[rid] = replace(svc.replicas[rid], routable=routable)
            pending = self._pending.get(rid)
            if pending is not None and not routable:
                pending.routable = False
        self._observe(service)

    async def stop_replicas(
        self, service: str, replica_ids: Sequence[str], *, drain_timeout: float = 30.0
    ) -> None:
        svc = self.services.get(service)
        if svc is None:
            return
        for rid in replica_ids:
            self._pending.pop(rid, None)  # a stopped replica is never restarted
            if svc.replicas.pop(rid, None) is not None:
                self.stopped.append(rid)
                self._observe(service)

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
        self._restart_due(service)
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

    def kill_replica(self, replica_id: str, exit_code: int = -9) -> None:
        """The replica dies (``kill -9``); it is restarted once its backoff has passed on
        ``now``, with the same id, a new port, ``restarts`` + 1, and routable again only if it
        was before. The restart is seen by the next ``service_state`` / ``start_revision``."""
        for name, svc in self.services.items():
            r = svc.replicas.get(replica_id)
            if r is None or not r.alive:
                continue
            kills = self._kills[replica_id] = self._kills.get(replica_id, 0) + 1
            delay = min(self.restart_delay_max, self.restart_delay * 2.0 ** min(kills - 1, 60))
            self._pending[replica_id] = _PendingRestart(name, self.now() + delay, r.routable)
            svc.replicas[replica_id] = replace(
                r, state="crashed", exit_code=exit_code, routable=False, next_restart_in=delay
            )
            self._observe(name)

    def _restart_due(self, service: str) -> None:
        svc = self.services[service]
        now = self.now()
        for rid, pending in list(self._pending.items()):
            r = svc.replicas.get(rid)
            if pending.service != service or r is None:
                continue
            if now < pending.due:
                svc.replicas[rid] = replace(r, next_restart_in=pending.due - now)
                continue
            del self._pending[rid]
            svc.replicas[rid] = replace(
                r,
                state="running",
                port=next(self._ports),
                routable=pending.routable,
                exit_code=None,
                last_exit_code=r.exit_code,
                restarts=r.restarts + 1,
                next_restart_in=None,
            )
            self.restarted.append(rid)
            self._observe(service)

    def running_revisions(self, service: str) -> set[str]:
        svc = self.services.get(service)
        return {r.revision for r in svc.replicas.values() if r.alive} if svc else set()
