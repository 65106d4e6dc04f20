"""In-memory ``Runtime`` + ``TrafficRouter`` honouring the same contract as the local agent
(tests/contract/test_runtime_contract.py runs one suite against both, the agent for real).

Used by orchestrator and API unit tests with a ``FakeClock`` (and ``health.fake.FakeProber``).

What it models as the agent does (the contract suite is the proof):

- Routing: what serves is the requested weights with the share of a revision that has no serving
  replica (alive and routable) moved to the others, as the agent's router does; that is what
  ``service_state().weights`` reports and ``verify_weight`` compares. ``FakeRouter.open`` sends
  one request through it: a sticky key's crc32 bucket (canary first), else smooth weighted
  round-robin, then round-robin over the revision's serving replicas; 503 when nothing serves.
  Requests are counted per revision like the router's counters.
- ``stop_replicas`` takes the replicas out of rotation at once, waits (up to ``drain_timeout``)
  for the requests they hold, then stops them.
- A replica that dies (``kill_replica``) is restarted after a doubling backoff on the injected
  clock, with the same id, a new port, ``restarts`` + 1, routable again only if it was; one of a
  revision in ``crashing`` dies again at every restart, its exit code reported each time.
- ``set_routable`` refuses an unknown replica and, to take traffic, a replica that is not alive.
- A revision whose artifact is not what its digest says is refused before anything changes
  (``ArtifactVerificationFailed``, ``check="digest"``), as the agent's own verification does.
  The fake has no files: ``artifact_digests`` says what the artifact at a location hashes to;
  a location it does not list is taken to match. (Signatures are the agent's alone: the fake
  sees no keys.)

Hooks (``run_hook``) run nothing: each call is recorded in ``hooks`` with what ran on the
service at that moment (so a test proves a ``pre_deploy`` hook ran before any candidate replica
started), and answers what ``hook_exit`` scripts for its point (default 0; ``None``: killed at
its timeout), having printed ``hook_output`` for its point. Its artifact is checked as a start's.

Test controls beyond that: ``crash`` (the replica stays down with no restart pending: something
the local agent never reports, kept for tests of callers), start failures (``fail_start``), a log
of every weight change and every replica count change to assert invariants on, and a steady
synthetic load for canary analysis (``FakeRouter.rps`` requests per second of the injected clock,
split by the weights that serve) where each revision answers per its ``TrafficProfile``.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import zlib
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from shipyard.errors import (
    ArtifactVerificationFailed,
    InvalidInput,
    NotFound,
    RevisionStartFailed,
    ShipyardError,
    TrafficSwitchFailed,
)
from shipyard.routing import table as routing_table
from shipyard.routing.metrics import BUCKET_BOUNDS_MS, RevisionCounters, RevisionMetrics
from shipyard.runtime.base import (
    MAX_LOG_LINES,
    HookResult,
    HookRun,
    LogBatch,
    LogLine,
    LogQuery,
    LogStream,
    ReplicaState,
    ReplicaStatus,
    RevisionSpec,
    ServiceState,
    StickyKey,
)

#: What the agent's router accepts as a sticky header or cookie name (an HTTP token).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass
class _Service:
    url: str
    #: What was asked for (revision -> percent, positive only, in the order given).
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


@dataclass(frozen=True)
class _Load:
    revision: str
    rps: float
    path: str
    until: float  # the runtime clock's reading when its lease runs out


@dataclass(eq=False)
class FakeExchange:
    """One request through the fake router: routed when opened, in flight until ``finish``.

    ``revision`` and ``replica_id`` say where it went; None when nothing served it (the router
    answered 503 itself, already finished).
    """

    service: str
    revision: str | None
    replica_id: str | None
    status: int | None = None
    _router: FakeRouter | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.status is not None

    def finish(self, status: int = 200, latency_ms: float = 2.0) -> None:
        """The replica answered ``status`` after ``latency_ms``."""
        if self.status is not None:
            raise RuntimeError(f"request to {self.replica_id} already finished ({self.status})")
        self.status = status
        if self._router is not None:
            self._router._finished(self, latency_ms)


@dataclass
class _Table:
    """What one service routes now (rebuilt when its weights or serving replicas change)."""

    weights: dict[str, int]
    backends: dict[str, list[str]]
    sticky: StickyKey | None
    schedule: list[str]
    buckets: list[str]
    next: int = 0
    rr: dict[str, int] = field(default_factory=dict)

    def pick(self, key: str | None) -> str | None:
        if key is not None and self.buckets:
            return self.buckets[zlib.crc32(key.encode()) % 100]
        if not self.schedule:
            return None
        revision = self.schedule[self.next]
        self.next = (self.next + 1) % len(self.schedule)
        return revision

    def replica(self, revision: str) -> str:
        replicas = self.backends[revision]
        i = self.rr.get(revision, 0)
        self.rr[revision] = (i + 1) % len(replicas)
        return replicas[i]

    def sticky_key(self, headers: Mapping[str, str]) -> str | None:
        """The sticky header's value (preferred), else the sticky cookie's, if the request has
        one (header names are case-insensitive, as in the agent's router)."""
        if self.sticky is None:
            return None
        lowered = {k.lower(): v for k, v in headers.items()}
        if self.sticky.header is not None:
            value = lowered.get(self.sticky.header.lower(), "").strip()
            if value:
                return value
        if self.sticky.cookie is not None:
            for part in lowered.get("cookie", "").split(";"):
                name, sep, value = part.strip().partition("=")
                if sep and name == self.sticky.cookie and value.strip('"'):
                    return value.strip('"')
        return None


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
        #: Awaited by ``metrics`` with the call's number (1 for the first) before the counters
        #: are read: a test makes a read slow by sleeping on its clock there.
        self.before_metrics: Callable[[int], Awaitable[None]] | None = None
        #: Requests answered 503 because nothing served (as the agent's router counts them).
        self.unrouted = 0
        self._served: dict[str, dict[str, _Served]] = {}
        self._last: dict[str, float] = {}
        self._counters: dict[str, dict[str, RevisionCounters]] = {}
        self._tables: dict[str, tuple[tuple[Any, ...], _Table]] = {}
        self._held: dict[str, int] = {}  # replica id -> requests in flight
        #: The built-in load per service (``drive_load``), every call, and every stop.
        self.loads: dict[str, _Load] = {}
        self.load_calls: list[tuple[str, str, float, str, float]] = []
        self.loads_stopped: list[str] = []
        self._drained: dict[str, asyncio.Event] = {}

    # --- what serves --------------------------------------------------------------------------

    def serving(self, service: str) -> dict[str, int]:
        """Revision -> percent that serves now: the requested weights, the share of revisions
        with no serving replica moved to the others (a zero left for those), as the agent's
        router reports it."""
        svc = self._rt.services.get(service)
        if svc is None:
            return {}
        self._rt._restart_due(service)
        return routing_table.effective_weights(dict(svc.weights), set(self._backends(svc)))

    @staticmethod
    def _backends(svc: _Service) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for rid, r in svc.replicas.items():
            if r.state == "running" and r.routable:
                out.setdefault(r.revision, []).append(rid)
        return out

    def _table(self, service: str) -> _Table:
        svc = self._rt.services[service]
        weights = self.serving(service)
        backends = self._backends(svc)
        sticky = self.sticky.get(service)
        signature = (
            tuple(weights.items()),
            tuple((k, tuple(v)) for k, v in backends.items()),
            sticky,
        )
        cached = self._tables.get(service)
        if cached is not None and cached[0] == signature:
            return cached[1]
        routed = [(rev, w) for rev, w in weights.items() if w > 0]
        table = _Table(
            weights=weights,
            backends=backends,
            sticky=sticky,
            schedule=routing_table.smooth_schedule(routed),
            # Buckets 0..99 by cumulative ranges in the order of the weights (canary first).
            buckets=[rev for rev, w in routed for _ in range(w)] if sticky else [],
        )
        self._tables[service] = (signature, table)
        return table

    # --- requests -----------------------------------------------------------------------------

    def open(self, service: str, *, headers: Mapping[str, str] | None = None) -> FakeExchange:
        """Send one request to ``service``'s stable URL; it stays in flight until ``finish``."""
        if service not in self._rt.services:
            raise NotFound(f"service {service} has no route")
        self._accrue(service)
        table = self._table(service)
        revision = table.pick(table.sticky_key(headers or {}))
        if revision is None:
            self.unrouted += 1
            return FakeExchange(service, None, None, status=503)
        replica_id = table.replica(revision)
        self._counter(service, revision).inflight += 1
        self._held[replica_id] = self._held.get(replica_id, 0) + 1
        return FakeExchange(service, revision, replica_id, _router=self)

    def send(
        self,
        service: str,
        *,
        headers: Mapping[str, str] | None = None,
        status: int = 200,
        latency_ms: float = 2.0,
    ) -> FakeExchange:
        """One request, answered at once with ``status`` (503 when nothing serves)."""
        exchange = self.open(service, headers=headers)
        if not exchange.done:
            exchange.finish(status, latency_ms)
        return exchange

    def _counter(self, service: str, revision: str) -> RevisionCounters:
        per_service = self._counters.setdefault(service, {})
        counter = per_service.get(revision)
        if counter is None:
            counter = per_service[revision] = RevisionCounters(revision)
        return counter

    def _finished(self, exchange: FakeExchange, latency_ms: float) -> None:
        assert exchange.revision is not None and exchange.replica_id is not None
        assert exchange.status is not None
        counter = self._counter(exchange.service, exchange.revision)
        counter.observe(exchange.status, latency_ms / 1000)
        counter.inflight -= 1
        left = self._held[exchange.replica_id] = self._held[exchange.replica_id] - 1
        if left == 0:
            self._held.pop(exchange.replica_id)
            drained = self._drained.pop(exchange.replica_id, None)
            if drained is not None:
                drained.set()

    async def drain(self, replica_ids: Sequence[str], timeout: float) -> bool:
        """Wait until the replicas hold no request; False if ``timeout`` passed first."""
        waits = []
        for rid in replica_ids:
            if self._held.get(rid):
                waits.append(self._drained.setdefault(rid, asyncio.Event()).wait())
        if not waits:
            return True
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*waits)
        except TimeoutError:
            return False
        return True

    # --- metrics ------------------------------------------------------------------------------

    def _accrue(self, service: str) -> None:
        """Count the synthetic requests served since the last look, at the weights serving, and
        the built-in load's (``drive_load``) on its revision while it has a serving replica."""
        now = self._rt.now()
        svc = self._rt.services.get(service)
        last = self._last.get(service, now)
        self._last[service] = now
        if svc is None or now <= last:
            return
        served = self._served.setdefault(service, {})
        shares = [
            (rev, self.rps * (now - last) * weight / 100)
            for rev, weight in self.serving(service).items()
            if self.rps
        ]
        load = self.loads.get(service)
        if load is not None and self.serving(service).get(load.revision, 0) > 0:
            shares.append((load.revision, load.rps * max(0.0, min(now, load.until) - last)))
        for rev, n in shares:
            profile = self.profiles.get(rev, TrafficProfile())
            s = served.setdefault(rev, _Served())
            s.requests += n
            s.errors += n * profile.error_rate
            s.latency_ms[profile.latency_ms] = s.latency_ms.get(profile.latency_ms, 0.0) + n

    # --- LoadDriver: the built-in load step ---------------------------------------------------

    async def drive_load(
        self, service: str, revision: str, rps: float, path: str, *, lease_seconds: float
    ) -> dict[str, Any]:
        """Like the agent: ``rps`` of ``GET path`` to ``revision`` only, for ``lease_seconds``
        of the runtime's clock unless renewed (answered as its ``TrafficProfile`` says)."""
        if service not in self._rt.services:
            raise NotFound(f"service {service} has no route")
        self._accrue(service)  # what came before is counted at the old rate
        self.load_calls.append((service, revision, rps, path, lease_seconds))
        self.loads[service] = _Load(revision, rps, path, self._rt.now() + lease_seconds)
        return {"revision": revision, "rps": rps, "path": path, "running": True}

    async def stop_load(self, service: str) -> dict[str, Any] | None:
        self._accrue(service)
        load = self.loads.pop(service, None)
        self.loads_stopped.append(service)
        if load is None:
            return None
        return {"revision": load.revision, "rps": load.rps, "path": load.path, "running": False}

    async def metrics(self, service: str) -> Mapping[str, Mapping[str, Any]]:
        self.metrics_calls += 1
        if self.before_metrics is not None:
            await self.before_metrics(self.metrics_calls)
        if self.metrics_error is not None:
            raise self.metrics_error
        self._accrue(service)
        synthetic = self._served.get(service, {})
        counted = self._counters.get(service, {})
        out: dict[str, Mapping[str, Any]] = {}
        for rev in [*synthetic, *(r for r in counted if r not in synthetic)]:
            buckets = [0] * len(BUCKET_BOUNDS_MS)
            s = synthetic.get(rev, _Served())
            for latency, n in s.latency_ms.items():
                buckets[bisect_left(BUCKET_BOUNDS_MS, latency)] += int(n)
            requests = sum(buckets)
            errors = min(requests, int(s.errors))
            m = RevisionMetrics(
                revision=rev,
                requests=requests,
                status_2xx=requests - errors,
                status_5xx=errors,
                latency_buckets=tuple(buckets),
                latency_sum_ms=sum(lat * int(n) for lat, n in s.latency_ms.items()),
            )
            c = counted.get(rev)
            if c is not None:
                m = m.plus(c.snapshot())
            out[rev] = m.to_dict()
        return out

    # --- TrafficRouter ------------------------------------------------------------------------

    async def set_weight(
        self, service: str, weights: Mapping[str, int], *, sticky: StickyKey | None = None
    ) -> None:
        self._accrue(service)
        svc = self._rt.services.get(service)
        if svc is None:
            raise TrafficSwitchFailed(f"service {service} has no route")
        bad = {k: v for k, v in weights.items() if not 0 <= v <= 100}
        if bad:
            raise TrafficSwitchFailed(f"weights must be within 0..100, got {bad}")
        positive = {k: v for k, v in weights.items() if v > 0}
        if positive and sum(positive.values()) != 100:
            raise TrafficSwitchFailed(f"weights must sum to 100, got {sum(positive.values())}")
        self._rt._restart_due(service)
        serving = self._backends(svc)
        for rev in positive:
            if rev not in serving:
                raise TrafficSwitchFailed(f"revision {rev} of {service} has no routable replica")
        names = (sticky.header, sticky.cookie) if sticky is not None else (None, None)
        for what, name in zip(("header", "cookie"), names, strict=True):
            if name is not None and not _TOKEN.fullmatch(name):
                raise TrafficSwitchFailed(f"sticky {what} {name!r} is not a valid name")
        svc.weights = positive
        self.sticky[service] = sticky if sticky and (sticky.header or sticky.cookie) else None
        for rev in positive:  # like the real router: counters exist once a revision is routed
            self._served.setdefault(service, {}).setdefault(rev, _Served())
            self._counter(service, rev)
        self.history.append((service, dict(positive)))

    async def verify_weight(self, service: str, weights: Mapping[str, int]) -> bool | None:
        if service not in self._rt.services:
            return False
        have = {k: v for k, v in self.serving(service).items() if v > 0}
        return have == {k: v for k, v in weights.items() if v > 0}

    async def remove_managed_routes(self, service: str) -> None:
        self._rt.services.pop(service, None)


@dataclass(frozen=True)
class HookCall:
    """One ``run_hook`` the fake answered: the hook, the spec it ran with, and the service's
    running revisions and serving weights at that moment."""

    hook: HookRun
    spec: RevisionSpec
    running: frozenset[str]
    weights: Mapping[str, int]


@dataclass
class _PendingRestart:
    service: str
    due: float
    #: Whether the replica was routable before it died (set_routable(False) clears it).
    routable: bool


class FakeRuntime:
    kind = "fake"
    #: Like an agent with a Docker Engine: directories and images alike.
    artifact_kinds: tuple[str, ...] = ("directory", "oci-image")

    def __init__(
        self,
        region: str = "local",
        now: Callable[[], float] | None = None,
        *,
        restart_delay: float = 0.5,
        restart_delay_max: float = 30.0,
    ) -> None:
        self.region = region
        #: The clock the synthetic load and the restart backoff run on (a FakeClock's ``now``).
        self.now = now or time.monotonic
        #: What log lines are stamped with (seconds since the epoch, as the agent's).
        self._wall = now or time.time
        self.services: dict[str, _Service] = {}
        self.router = FakeRouter(self)
        self.fail_start: set[str] = set()
        #: Artifact location -> the digest its content has (a location not listed matches any).
        self.artifact_digests: dict[str, str] = {}
        #: Revision -> exit code: its replicas die again at every restart (an app that fails at
        #: start), as the agent reports a crash loop: restarts counted, the exit code each time.
        self.crashing: dict[str, int] = {}
        self.started: list[str] = []
        self.stopped: list[str] = []
        #: Revision -> the spec it was (last) started with.
        self.specs: dict[str, RevisionSpec] = {}
        #: (service, running, ready) after every replica change: rolling invariants are
        #: asserted on this.
        self.observations: list[tuple[str, int, int]] = []
        #: The agent's backoff for ``kill_replica``: ``restart_delay`` doubling with every kill
        #: of the same replica, at most ``restart_delay_max`` (seconds of ``now``; the agent's
        #: reset after a long run is not modelled).
        self.restart_delay = restart_delay
        self.restart_delay_max = restart_delay_max
        #: Replica ids in the order they were restarted (and came up).
        self.restarted: list[str] = []
        self._pending: dict[str, _PendingRestart] = {}
        self._kills: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._ports = itertools.count(20000)
        #: Service -> replica id -> (its revision, what it printed). Kept after the replica
        #: stops, as the agent keeps stopped replicas' logs; a position is a line's index.
        self.logs: dict[str, dict[str, tuple[str, list[LogLine]]]] = {}
        #: Revision -> lines its replicas print each time they start (and crash, if
        #: ``crashing``): what an app prints before its traceback, for crash reports.
        self.output: dict[str, list[tuple[LogStream, str]]] = {}
        #: Every hook run, in order (``run_hook``).
        self.hooks: list[HookCall] = []
        #: Point -> exit code its hook answers (absent: 0; None: killed at its timeout).
        self.hook_exit: dict[str, int | None] = {}
        #: Point -> lines its hook prints.
        self.hook_output: dict[str, list[str]] = {}
        #: Points whose hook cannot start (``RevisionStartFailed``, as a missing command).
        self.hook_fail_start: set[str] = set()
        #: Point -> an event its hook runs until (a hook that takes a while: abort it meanwhile).
        self.hook_running: dict[str, asyncio.Event] = {}

    async def ensure_service(self, service: str) -> str:
        # Each region its own URL (the local one as it always was).
        host = "fake" if self.region == "local" else f"{self.region}.fake"
        svc = self.services.setdefault(service, _Service(url=f"http://{host}/{service}"))
        return svc.url

    async def start_revision(self, spec: RevisionSpec) -> list[ReplicaStatus]:
        self._check_artifact(spec)
        if spec.revision in self.fail_start:
            what = spec.argv[0] if spec.argv else spec.artifact_location
            raise RevisionStartFailed(f"cannot start {what!r} for revision {spec.revision}")
        await self.ensure_service(spec.service)
        self.specs[spec.revision] = spec
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
            self.logs.setdefault(spec.service, {})[rid] = (spec.revision, [])
            self._print_output(spec.service, rid, spec.revision)
            self._observe(spec.service)
        return alive

    async def run_hook(
        self, spec: RevisionSpec, hook: HookRun, on_output: Callable[[str], None]
    ) -> HookResult:
        """See the module docstring: recorded, scripted, nothing runs."""
        self._check_artifact(spec)
        if hook.point in self.hook_fail_start:
            raise RevisionStartFailed(
                f"cannot start {hook.argv[0]!r} for revision {spec.revision}: not found on PATH",
                command=hook.argv[0],
            )
        svc = self.services.get(spec.service)
        self.hooks.append(
            HookCall(
                hook,
                spec,
                frozenset(self.running_revisions(spec.service)),
                dict(self.router.serving(spec.service)) if svc is not None else {},
            )
        )
        for line in self.hook_output.get(hook.point, []):
            on_output(line)
        if hook.point in self.hook_running:
            await self.hook_running[hook.point].wait()
        code = self.hook_exit.get(hook.point, 0)
        return HookResult(code, 5, timed_out=code is None)

    def _check_artifact(self, spec: RevisionSpec) -> None:
        actual = self.artifact_digests.get(spec.artifact_location, spec.artifact_digest)
        if actual != spec.artifact_digest:
            raise ArtifactVerificationFailed(
                f"agent refused to start {spec.service}/{spec.revision}: digest check failed: "
                f"artifact at {spec.artifact_location} has digest {actual}, expected "
                f"{spec.artifact_digest}",
                check="digest",
                reason="content_mismatch",
                digest=spec.artifact_digest,
                actual=actual,
            )

    def _observe(self, service: str) -> None:
        svc = self.services[service]
        running = sum(1 for r in svc.replicas.values() if r.alive)
        ready = sum(1 for r in svc.replicas.values() if r.alive and r.routable)
        self.observations.append((service, running, ready))

    async def set_routable(self, service: str, replica_ids: Sequence[str], routable: bool) -> None:
        svc = self.services.get(service)
        self._restart_due(service)
        # Like the agent: every id is checked before any is changed.
        for rid in replica_ids:
            r = svc.replicas.get(rid) if svc else None
            if r is None:
                raise InvalidInput(f"replica {rid} not found in {service}", status=404)
            if routable and not r.alive:
                raise InvalidInput(
                    f"replica {rid} is {r.state}; it cannot take traffic", status=409
                )
        await self.ensure_service(service)
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
        targets = [rid for rid in replica_ids if rid in svc.replicas]
        for rid in targets:
            self._pending.pop(rid, None)  # a stopped replica is never restarted
            svc.replicas[rid] = replace(svc.replicas[rid], routable=False)  # no new requests
        if targets:
            self._observe(service)
        # The requests they hold finish first (like the agent, a drain that times out stops
        # them anyway).
        await self.router.drain(targets, drain_timeout)
        for rid in targets:
            if svc.replicas.pop(rid, None) is not None:
                self.stopped.append(rid)
                self._observe(service)

    async def stop_revision(
        self, service: str, revision: str, *, drain_timeout: float = 30.0
    ) -> None:
        svc = self.services.get(service)
        if svc is not None:
            ids = [rid for rid, r in svc.replicas.items() if r.revision == revision]
            await self.stop_replicas(service, ids, drain_timeout=drain_timeout)

    async def service_state(self, service: str) -> ServiceState | None:
        svc = self.services.get(service)
        if svc is None:
            return None
        self._restart_due(service)
        weights = self.router.serving(service)
        return ServiceState(service, svc.url, weights, list(svc.replicas.values()))

    async def list_services(self) -> list[str]:
        return sorted(self.services)

    async def read_logs(self, service: str, query: LogQuery) -> LogBatch:
        """The agent's ``replica_logs.read`` over the lines kept in ``logs``."""
        replicas = {
            rid: lines
            for rid, (revision, lines) in self.logs.get(service, {}).items()
            if (query.revision is None or revision == query.revision)
            and (query.replica_id is None or rid == query.replica_id)
        }
        if not replicas:
            what = (
                f"replica {query.replica_id}"
                if query.replica_id is not None
                else f"revision {query.revision}"
                if query.revision is not None
                else "service"
            )
            raise NotFound(f"no logs of {what} of {service} on this agent")
        limit = max(0, min(query.tail, MAX_LOG_LINES))
        entries: list[tuple[LogLine, int]] = []
        cursor: dict[str, int] = {}
        for rid, lines in replicas.items():
            numbered = [(line, i + 1) for i, line in enumerate(lines)]
            if query.after is not None:
                start = query.after.get(rid, 0)
                got = numbered[start : start + limit]
                cursor[rid] = got[-1][1] if got else start
            else:
                got = numbered[max(0, len(numbered) - limit) :] if limit else []
                cursor[rid] = len(lines)
            if query.since is not None:
                got = [e for e in got if e[0].timestamp >= query.since]
            entries += got
        entries.sort(key=lambda e: (e[0].timestamp, e[0].replica_id, e[1]))
        if query.after is None:
            last = entries[max(0, len(entries) - limit) :] if limit else []
            return LogBatch([line for line, _ in last], cursor)
        taken = entries[:limit]
        for rid in replicas:
            mine = [pos for line, pos in entries if line.replica_id == rid]
            kept = [pos for line, pos in taken if line.replica_id == rid]
            if len(kept) < len(mine):
                cursor[rid] = kept[-1] if kept else query.after.get(rid, 0)
        return LogBatch([line for line, _ in taken], cursor)

    # --- test controls ---------------------------------------------------------------------------

    def print(self, replica_id: str, text: str, stream: LogStream = "stdout") -> None:
        """The replica prints one line (stamped with ``now``)."""
        for replicas in self.logs.values():
            if replica_id in replicas:
                revision, lines = replicas[replica_id]
                lines.append(LogLine(self._wall(), replica_id, revision, stream, text))
                return
        raise KeyError(replica_id)

    def _print_output(self, service: str, replica_id: str, revision: str) -> None:
        for stream, text in self.output.get(revision, []):
            self.print(replica_id, text, stream)

    def crash(self, replica_id: str, exit_code: int = 1) -> None:
        """The replica dies and nothing restarts it (the agent would; see ``kill_replica``)."""
        for svc in self.services.values():
            if replica_id in svc.replicas:
                svc.replicas[replica_id] = replace(
                    svc.replicas[replica_id],
                    state=_dead_state(exit_code),
                    exit_code=exit_code,
                    routable=False,
                )

    def kill_replica(self, replica_id: str, exit_code: int = -9) -> None:
        """The replica dies (``kill -9`` by default); it is restarted once its backoff has
        passed on ``now``, with the same id, a new port, ``restarts`` + 1, and routable again
        only if it was before. The restart is seen by the next ``service_state`` /
        ``start_revision`` / request."""
        for name, svc in self.services.items():
            r = svc.replicas.get(replica_id)
            if r is None or not r.alive:
                continue
            self._died(name, svc, r, exit_code, routable=r.routable, at=self.now())

    def _died(
        self,
        service: str,
        svc: _Service,
        r: ReplicaStatus,
        exit_code: int,
        *,
        routable: bool,
        at: float,
    ) -> None:
        kills = self._kills[r.replica_id] = self._kills.get(r.replica_id, 0) + 1
        delay = min(self.restart_delay_max, self.restart_delay * 2.0 ** min(kills - 1, 60))
        self._pending[r.replica_id] = _PendingRestart(service, at + delay, routable)
        svc.replicas[r.replica_id] = replace(
            r,
            state=_dead_state(exit_code),
            exit_code=exit_code,
            routable=False,
            next_restart_in=delay,
        )
        self._observe(service)

    def _restart_due(self, service: str) -> None:
        svc = self.services.get(service)
        if svc is None:
            return
        # A replica of a crashing revision may die again at once and be due again later: loop
        # until no restart is due now.
        while True:
            now = self.now()
            due = [
                (rid, p)
                for rid, p in self._pending.items()
                if p.service == service and rid in svc.replicas and p.due <= now
            ]
            for rid, p in self._pending.items():
                r = svc.replicas.get(rid)
                if p.service == service and r is not None and p.due > now:
                    svc.replicas[rid] = replace(r, next_restart_in=p.due - now)
            if not due:
                return
            for rid, pending in due:
                del self._pending[rid]
                r = svc.replicas[rid]
                restarted = replace(
                    r,
                    state="running",
                    port=next(self._ports),
                    routable=pending.routable,
                    exit_code=None,
                    last_exit_code=r.exit_code,
                    restarts=r.restarts + 1,
                    next_restart_in=None,
                )
                svc.replicas[rid] = restarted
                self._print_output(service, rid, r.revision)
                code = self.crashing.get(r.revision)
                if code is not None:  # it exits again before it is ever ready
                    self._died(
                        service, svc, restarted, code, routable=pending.routable, at=pending.due
                    )
                    continue
                self.restarted.append(rid)
                self._observe(service)

    def running_revisions(self, service: str) -> set[str]:
        svc = self.services.get(service)
        return {r.revision for r in svc.replicas.values() if r.alive} if svc else set()


def _dead_state(exit_code: int) -> ReplicaState:
    # The agent's supervisor: a clean exit is "exited", anything else "crashed".
    return "exited" if exit_code == 0 else "crashed"
