"""One ``Runtime`` over several regions: what a fleet deployment (``target.regions``) runs its plan
through, so the orchestrator's steps, health gates and rollback work unchanged.

``FleetRuntime`` fans every call out to its member runtimes (one per region, each the region's own
``Runtime``: the embedded agent, a remote agent over mutual TLS, or a fake) concurrently, and
returns only when every region has answered: each call is a barrier by construction, so no region
gets the next step (a traffic change) before every region finished the one before it. Each
region's call is bounded by ``timeout`` (the manifest's ``[fleet] region_timeout_seconds``) on the
injected clock; a region that does not answer raises ``RegionUnreachable`` naming it (after the
other regions finished theirs), and is remembered in ``timed_out``. Any other error is re-raised
with the region in its message and detail.

Replica ids are namespaced by region (``eu/abc1234-1``): ids a call returns carry the prefix, and
ids handed back (``set_routable``, ``stop_replicas``, a log query) go to that region only, so a
health gate or a crash report over the merged replica list needs nothing fleet-specific.

``run_hook`` is the exception to the fan-out: a hook (a migration) runs once per deployment, so
it goes to the first region the fleet reaches, bounded by the hook's own timeout plus
``timeout`` rather than by ``timeout`` alone.

``FleetRouter`` does the same for traffic: ``set_weight`` goes to every region at once and the
skew (first to last region's acknowledgement, on the clock's ``monotonic()``) of each change is in
``last_switch``; ``metrics`` is the fleet's merged counters, ``region_metrics`` each region's own
(canary analysis judges both). Built by ``orchestrator.context.DeploymentContext`` for a fleet
record; regions marked unreachable are left out (``exclude``) so a rollback acts on every region
it can reach.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from shipyard.domain.clock import Clock
from shipyard.errors import (
    AgentUnavailable,
    InvalidInput,
    NotFound,
    RegionUnreachable,
    ShipyardError,
)
from shipyard.routing.metrics import RevisionMetrics
from shipyard.runtime.base import (
    HookResult,
    HookRun,
    LogBatch,
    LogLine,
    LogQuery,
    MeteredRouter,
    ReplicaStatus,
    RevisionSpec,
    Runtime,
    ServiceState,
    StickyKey,
)

_T = TypeVar("_T")

#: Between a region and a member runtime's own replica id (region names are DNS labels).
SEPARATOR = "/"


def namespaced(region: str, replica_id: str) -> str:
    return f"{region}{SEPARATOR}{replica_id}"


def split(replica_id: str) -> tuple[str, str]:
    """``(region, member replica id)``; InvalidInput for an id without a region."""
    region, sep, rid = replica_id.partition(SEPARATOR)
    if not sep or not region or not rid:
        raise InvalidInput(f"{replica_id!r} is not a fleet replica id (region/replica)")
    return region, rid


class CallTimedOut(Exception):
    """``bounded``'s call did not answer in time (not a ``ShipyardError``: callers translate it
    into what it means to them, ``RegionUnreachable`` here)."""


async def bounded(clock: Clock, seconds: float, call: Awaitable[_T]) -> _T:
    """``call``'s answer, or ``CallTimedOut`` once ``seconds`` passed on ``clock`` (a FakeClock in
    unit tests: a region whose call hangs times out without any real wait). The abandoned call
    is cancelled and not waited for: a hung connection must not hold the fleet."""
    task = asyncio.ensure_future(call)
    timer = asyncio.ensure_future(clock.sleep(seconds))
    try:
        await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        timer.cancel()
        raise
    timer.cancel()
    if task.done():
        return task.result()
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    raise CallTimedOut


@dataclass(frozen=True)
class SwitchAcks:
    """When each region acknowledged one traffic change (``clock.monotonic()`` readings)."""

    weights: Mapping[str, int]
    acks: Mapping[str, float]

    @property
    def skew_ms(self) -> float:
        if not self.acks:
            return 0.0
        return (max(self.acks.values()) - min(self.acks.values())) * 1000

    def offsets_ms(self) -> dict[str, float]:
        first = min(self.acks.values(), default=0.0)
        return {r: round((t - first) * 1000, 3) for r, t in self.acks.items()}


@dataclass
class FleetRuntime:
    """A ``Runtime`` over ``members`` (region -> runtime, in the fleet's order); see the module
    docstring."""

    members: Mapping[str, Runtime]
    clock: Clock
    #: Seconds each region has to answer one call (``[fleet] region_timeout_seconds``).
    timeout: float = 30.0
    #: Regions left out of every call (marked unreachable: a rollback goes on without them).
    excluded: set[str] = field(default_factory=set)
    #: Regions that did not answer a call within ``timeout`` since this runtime was made.
    timed_out: set[str] = field(default_factory=set)
    #: Each region's service URL, from ``ensure_service``.
    urls: dict[str, str] = field(default_factory=dict)
    kind: str = "fleet"

    def __post_init__(self) -> None:
        if not self.members:
            raise InvalidInput("a fleet needs at least one region")
        self.region = next(iter(self.members))
        drives_load = all(hasattr(rt.router, "drive_load") for rt in self.members.values())
        self._router: FleetRouter = (LoadDrivingFleetRouter if drives_load else FleetRouter)(self)

    @property
    def regions(self) -> list[str]:
        """The regions calls go to (every member not excluded)."""
        return [r for r in self.members if r not in self.excluded]

    def exclude(self, region: str) -> None:
        self.excluded.add(region)

    @property
    def router(self) -> FleetRouter:
        return self._router

    @property
    def artifact_kinds(self) -> tuple[str, ...]:
        """What every region can run (pre-flight refuses anything else before it starts)."""
        kinds = [getattr(rt, "artifact_kinds", ("directory",)) for rt in self.members.values()]
        return tuple(k for k in kinds[0] if all(k in other for other in kinds[1:]))

    @property
    def artifact_kind_problems(self) -> dict[str, str]:
        problems: dict[str, str] = {}
        for region, rt in self.members.items():
            for kind, why in getattr(rt, "artifact_kind_problems", {}).items():
                problems.setdefault(kind, f"region {region}: {why}")
        return problems

    # --- fan-out -------------------------------------------------------------------------------

    async def each(
        self,
        what: str,
        call: Callable[[str, Runtime], Awaitable[_T]],
        regions: Sequence[str] | None = None,
        *,
        on_answer: Callable[[str], None] | None = None,
    ) -> dict[str, _T]:
        """``call`` in every region (or ``regions``) at once, each bounded by ``timeout``;
        returns once all answered. A failure is raised after the others finished (the first
        region's in fleet order), named by region; a silent region as ``RegionUnreachable``."""
        names = list(self.regions if regions is None else regions)

        async def one(region: str) -> _T:
            try:
                answer = await bounded(self.clock, self.timeout, call(region, self.members[region]))
            except CallTimedOut:
                self.timed_out.add(region)
                raise RegionUnreachable(
                    f"region {region} did not answer {what} within {self.timeout:g} s "
                    "([fleet] region_timeout_seconds)",
                    region=region,
                    call=what,
                ) from None
            except AgentUnavailable as exc:
                # The transport gave up before our bound (a connect or TLS handshake timeout
                # to a stopped agent, a refused connection): as silent as a timeout.
                self.timed_out.add(region)
                raise RegionUnreachable(
                    f"region {region} did not answer {what}: {exc.message}",
                    region=region,
                    call=what,
                ) from exc
            except ShipyardError as exc:
                if exc.detail.get("region") is None:
                    exc.message = f"region {region}: {exc.message}"
                    exc.args = (exc.message,)
                    exc.detail["region"] = region
                raise
            if on_answer is not None:
                on_answer(region)
            return answer

        results = await asyncio.gather(*(one(r) for r in names), return_exceptions=True)
        out: dict[str, _T] = {}
        failures: list[BaseException] = []
        for region, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                failures.append(result)
            else:
                out[region] = result
        # A region that answered with an error is the cause; a silent one is reported too
        # (``timed_out``) but names the failure only when nothing else went wrong.
        failures.sort(key=lambda e: isinstance(e, RegionUnreachable))
        if failures:
            raise failures[0]
        return out

    # --- Runtime ---------------------------------------------------------------------------------

    async def ensure_service(self, service: str) -> str:
        urls = await self.each("ensure_service", lambda _, rt: rt.ensure_service(service))
        self.urls.update(urls)
        return urls.get(self.region) or next(iter(urls.values()), "")

    async def start_revision(self, spec: RevisionSpec) -> list[ReplicaStatus]:
        started = await self.each("start_revision", lambda _, rt: rt.start_revision(spec))
        return [_named(r, replica) for r in self.regions for replica in started.get(r, [])]

    async def set_routable(self, service: str, replica_ids: Sequence[str], routable: bool) -> None:
        by_region = _by_region(replica_ids)
        await self.each(
            "set_routable",
            lambda r, rt: rt.set_routable(service, by_region[r], routable),
            [r for r in self.regions if r in by_region],
        )

    async def stop_replicas(
        self, service: str, replica_ids: Sequence[str], *, drain_timeout: float = 30.0
    ) -> None:
        by_region = _by_region(replica_ids)
        await self.each(
            "stop_replicas",
            lambda r, rt: rt.stop_replicas(service, by_region[r], drain_timeout=drain_timeout),
            [r for r in self.regions if r in by_region],
        )

    async def stop_revision(
        self, service: str, revision: str, *, drain_timeout: float = 30.0
    ) -> None:
        await self.each(
            "stop_revision",
            lambda _, rt: rt.stop_revision(service, revision, drain_timeout=drain_timeout),
        )

    async def service_state(self, service: str) -> ServiceState | None:
        """Every region's replicas (namespaced) together; the weights and URL of the first
        region that has the service (a fleet routes the same weights everywhere; the
        per-region view is each member's own ``service_state``)."""
        states = await self.each("service_state", lambda _, rt: rt.service_state(service))
        present = [(r, s) for r in self.regions if (s := states.get(r)) is not None]
        if not present:
            return None
        first = present[0][1]
        replicas = [_named(r, replica) for r, s in present for replica in s.replicas]
        return ServiceState(service, first.url, dict(first.weights), replicas)

    async def read_logs(self, service: str, query: LogQuery) -> LogBatch:
        """One region's logs when the query names a replica, else every region's, by time."""
        regions = self.regions
        if query.replica_id is not None:
            region, rid = split(query.replica_id)
            if region not in self.members:
                raise NotFound(f"replica {query.replica_id}: no region {region} in this fleet")
            regions = [region]
            query = LogQuery(query.revision, rid, query.tail, query.since, query.after)
        after = _by_region(list(query.after or {}), strict=False)
        cursors = dict(query.after or {})

        def ask(region: str, rt: Runtime) -> Awaitable[LogBatch]:
            mine = None
            if query.after is not None:
                mine = {split(k)[1]: cursors[k] for k in after.get(region, [])}
            return rt.read_logs(
                service, LogQuery(query.revision, query.replica_id, query.tail, query.since, mine)
            )

        batches = await self.each("read_logs", ask, regions)
        lines = sorted(
            (
                LogLine(
                    line.timestamp,
                    namespaced(r, line.replica_id),
                    line.revision,
                    line.stream,
                    line.text,
                )
                for r, batch in batches.items()
                for line in batch.lines
            ),
            key=lambda line: line.timestamp,
        )
        cursor = {namespaced(r, k): v for r, b in batches.items() for k, v in b.cursor.items()}
        if query.after is None:
            lines = lines[-query.tail :] if query.tail else []
        return LogBatch(lines, cursor)

    async def list_services(self) -> list[str]:
        names = await self.each("list_services", lambda _, rt: rt.list_services())
        return sorted({n for found in names.values() for n in found})

    async def run_hook(
        self, spec: RevisionSpec, hook: HookRun, on_output: Callable[[str], None]
    ) -> HookResult:
        """In the first region only (see the module docstring)."""
        region = self.regions[0] if self.regions else self.region
        rt = self.members[region]
        try:
            return await bounded(
                self.clock, hook.timeout_seconds + self.timeout, rt.run_hook(spec, hook, on_output)
            )
        except CallTimedOut:
            self.timed_out.add(region)
            raise RegionUnreachable(
                f"region {region} did not finish hook {hook.point} within "
                f"{hook.timeout_seconds + self.timeout:g} s",
                region=region,
                call="run_hook",
            ) from None
        except ShipyardError as exc:
            if exc.detail.get("region") is None:
                exc.message = f"region {region}: {exc.message}"
                exc.args = (exc.message,)
                exc.detail["region"] = region
            raise


class FleetRouter:
    """The fleet's ``MeteredRouter`` (see the module docstring)."""

    type = "fleet"

    def __init__(self, fleet: FleetRuntime) -> None:
        self.fleet = fleet
        #: The last traffic change: each region's acknowledgement time (its skew).
        self.last_switch: SwitchAcks | None = None

    def _member(self, rt: Runtime) -> MeteredRouter:
        return rt.router

    async def set_weight(
        self, service: str, weights: Mapping[str, int], *, sticky: StickyKey | None = None
    ) -> None:
        """Every region at once; each acknowledgement's time is kept, also when a region
        fails (the skew of what was applied)."""
        acks: dict[str, float] = {}
        clock = self.fleet.clock
        self.last_switch = None
        try:
            await self.fleet.each(
                "set_weight",
                lambda _, rt: rt.router.set_weight(service, weights, sticky=sticky),
                on_answer=lambda region: acks.__setitem__(region, clock.monotonic()),
            )
        finally:
            self.last_switch = SwitchAcks(dict(weights), acks)

    async def verify_weight(self, service: str, weights: Mapping[str, int]) -> bool | None:
        answers = await self.fleet.each(
            "verify_weight", lambda _, rt: rt.router.verify_weight(service, weights)
        )
        if any(a is False for a in answers.values()):
            return False
        return True if all(a is True for a in answers.values()) else None

    async def remove_managed_routes(self, service: str) -> None:
        await self.fleet.each(
            "remove_managed_routes", lambda _, rt: rt.router.remove_managed_routes(service)
        )

    async def region_metrics(self, service: str) -> dict[str, Mapping[str, Mapping[str, Any]]]:
        """Each region's own ``{revision: counters}``."""
        return await self.fleet.each("metrics", lambda _, rt: rt.router.metrics(service))

    async def metrics(self, service: str) -> Mapping[str, Mapping[str, Any]]:
        """The fleet's counters: every region's summed per revision."""
        return merged((await self.region_metrics(service)).values())


class LoadDrivingFleetRouter(FleetRouter):
    """A fleet whose every region can drive load (``runtime.base.LoadDriver``): the built-in
    load runs in every region, each at the policy's rate."""

    async def drive_load(
        self, service: str, revision: str, rps: float, path: str, *, lease_seconds: float
    ) -> Mapping[str, Any]:
        got = await self.fleet.each(
            "drive_load",
            lambda _, rt: rt.router.drive_load(  # type: ignore[attr-defined]
                service, revision, rps, path, lease_seconds=lease_seconds
            ),
        )
        return _summed(got.values())

    async def stop_load(self, service: str) -> Mapping[str, Any] | None:
        got = await self.fleet.each(
            "stop_load",
            lambda _, rt: rt.router.stop_load(service),  # type: ignore[attr-defined]
        )
        answered = [g for g in got.values() if g is not None]
        return _summed(answered) if answered else None


# --- helpers --------------------------------------------------------------------------------------


def _named(region: str, replica: ReplicaStatus) -> ReplicaStatus:
    return replace(replica, replica_id=namespaced(region, replica.replica_id))


def _by_region(replica_ids: Sequence[str], *, strict: bool = True) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rid in replica_ids:
        if not strict and SEPARATOR not in rid:
            continue
        region, own = split(rid)
        out.setdefault(region, []).append(own if strict else rid)
    return out


def _summed(answers: Any) -> dict[str, Any]:
    """Integer counters of several regions' answers added up."""
    out: dict[str, Any] = {}
    for answer in answers:
        for key, value in answer.items():
            if isinstance(value, int) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
    return out


def merged(
    snapshots: Any,
) -> dict[str, dict[str, Any]]:
    """Several routers' ``{revision: RevisionMetrics.to_dict()}`` as one: counters and latency
    buckets added, quantiles computed again from the sum."""
    total: dict[str, RevisionMetrics] = {}
    for snapshot in snapshots:
        for revision, counters in snapshot.items():
            m = RevisionMetrics.from_dict({**counters, "revision": revision})
            before = total.get(revision)
            total[revision] = m if before is None else before.plus(m)
    return {revision: m.to_dict() for revision, m in total.items()}
