"""The fake world every orchestrator test drives: the real ``Pipeline`` and SQLite store over a
fake runtime/router (optionally with synthetic load), scripted health, a fake builder, an
in-memory audit log and a ``FakeClock``.

Deployments are submitted and followed through the world (``deploy``, ``submit``, ``wait``,
``rollback``, ``promote``, ``abort``), which answer with the stored document as JSON (what the
API shows, plus progress), so tests read what a user would. ``until`` waits for a deployment to
reach a condition, woken by every write of its record (no polling, no loop-turn counting).
``crash_when_persisted`` and ``restart`` simulate a control plane killed and started again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.trace import Tracer

from shipyard import tracing
from shipyard.audit import MemoryAuditLog
from shipyard.audit.publishing import Checkpoints
from shipyard.build.fake import FakeBuilder
from shipyard.domain.clock import FakeClock
from shipyard.domain.manifest import parse_manifest
from shipyard.domain.models import DeploymentRequest
from shipyard.health.fake import FakeProber
from shipyard.orchestrator import build_slots
from shipyard.orchestrator.pipeline import Pipeline
from shipyard.orchestrator.record import DeploymentRecord, RollbackRecord, dump_record
from shipyard.runtime.base import Runtime
from shipyard.runtime.fake import FakeRuntime, TrafficProfile
from shipyard.security.app_secrets import AppSecrets
from shipyard.security.gate import SecurityGate
from shipyard.security.sealing import Sealer
from shipyard.store.db import AsyncStore, Store
from shipyard.store.engine import open_engine
from shipyard.store.leases import LeaseClaim
from shipyard.store.secrets import SecretStore

#: A service manifest with canary analysis thresholds and a sticky key, for progressive rollouts.
PROGRESSIVE = """
[service]
name = "api"
[run]
command = "python3 app.py"
replicas = {replicas}
[health]
endpoint = "/health"
interval_seconds = 1
success_threshold = 2
failure_threshold = 3
[analysis]
min_success_rate = 0.99
max_p99_latency_ms = 200
min_requests = 50
interval_seconds = 10
[routing]
sticky_header = "x-user"
"""

Doc = dict[str, Any]


class ObservedStore(AsyncStore):
    """The store, telling the world about every deployment document written."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.changed = asyncio.Condition()

    async def create_deployment(
        self, doc: dict[str, Any], *, active: bool = True, lease: LeaseClaim | None = None
    ) -> None:
        await super().create_deployment(doc, active=active, lease=lease)
        await self._notify()

    async def save_deployment(self, doc: dict[str, Any], *, active: bool) -> None:
        await super().save_deployment(doc, active=active)
        await self._notify()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()


class PipelineWorld:
    def __init__(
        self,
        tmp: Path,
        *,
        builder: FakeBuilder | None = None,
        replicas: int | None = None,
        rps: float = 0.0,
        now: float | None = None,
        regions: Sequence[str] = ("local",),
        database: str | None = None,
    ) -> None:
        """``replicas``: build with the ``PROGRESSIVE`` manifest (canary analysis, sticky key)
        and that many replicas; None: the fake builder's default manifest. ``now``: the fake
        clock's start (a store written earlier holds deadlines of its own time). ``regions``:
        one fake data plane each (``fakes``); ``runtime`` is the first's. ``runtimes`` is the
        mapping the pipeline uses (a test may put a wrapper in it before deploying).
        ``database``: a PostgreSQL URL for the store (None: SQLite in ``tmp``)."""
        if builder is None:
            manifest = None if replicas is None else parse_manifest(progressive(replicas))
            builder = FakeBuilder(manifest=manifest)
        self.clock = FakeClock() if now is None else FakeClock(start=now)
        self.fakes = {region: FakeRuntime(region, now=self.clock.now) for region in regions}
        for fake in self.fakes.values():
            fake.router.rps = rps  # synthetic requests per second through every service
        self.runtime = self.fakes[regions[0]]
        self.runtimes: dict[str, Runtime] = dict(self.fakes)
        self.prober = FakeProber()
        self.builder = builder
        self.audit = MemoryAuditLog(clock=self.clock.now)
        #: The store as tests read it (synchronously); the pipeline uses ``astore``.
        self.store = Store(open_engine(database, tmp))
        self.astore = ObservedStore(self.store)
        self.gate: SecurityGate | None = None
        self.attestations_dir: Path | None = None
        self.checkpoints: Checkpoints | None = None
        #: Builds at once (``Pipeline(max_concurrent_builds=)``); set before ``new_pipeline``.
        self.build_limit = build_slots.DEFAULT_LIMIT
        #: Makes the deployments' spans (``Pipeline(tracer=)``); set before ``new_pipeline``.
        self.tracer: Tracer = tracing.NOOP
        #: The services' secrets (``shipyard secret set``), sealed with a key in ``tmp/keys``.
        self.secrets = AppSecrets(
            SecretStore(self.store.engine), Sealer.for_dir(tmp), self.audit, self.clock
        )
        self.pipeline = self.new_pipeline()

    def new_pipeline(self, replica_id: str = "local", lease_seconds: float = 10.0) -> Pipeline:
        """A fresh control plane over the same store and data plane (a restart; with another
        ``replica_id``, a second replica beside the first)."""
        return Pipeline(
            store=self.astore,
            audit=self.audit,
            builder=self.builder,
            runtimes=self.runtimes,
            prober=self.prober,
            clock=self.clock,
            gate=self.gate,
            attestations_dir=self.attestations_dir,
            checkpoints=self.checkpoints,
            max_concurrent_builds=self.build_limit,
            replica_id=replica_id,
            lease_seconds=lease_seconds,
            tracer=self.tracer,
            secrets=self.secrets,
        )

    # --- deployments -------------------------------------------------------------------------

    async def submit(
        self,
        commit: str,
        strategy: dict[str, Any],
        *,
        service: str = "api",
        regions: Sequence[str] | None = None,
    ) -> Doc:
        """``regions``: a fleet deployment to these; None: the first region alone."""
        target: dict[str, Any] = {"service_name": service, "region": next(iter(self.fakes))}
        if regions is not None:
            target = {"service_name": service, "regions": list(regions)}
        req = DeploymentRequest.model_validate(
            {
                "source": {"repository": "/repo", "branch": "main", "commit": commit},
                "target": target,
                "strategy": strategy,
            }
        )
        return await self.submit_request(req)

    async def submit_request(self, request: DeploymentRequest, user: str = "alice") -> Doc:
        return doc(await self.pipeline.submit(request, user))

    async def deploy(
        self,
        commit: str,
        strategy: dict[str, Any] | None = None,
        *,
        wait: bool = True,
        **blue_green: Any,
    ) -> Doc:
        """Submit and (by default) wait for the end. Without ``strategy``: blue-green with a
        30 s switch delay, a 60 s bake and 30 s warm, overridden by ``blue_green``."""
        if strategy is None:
            params = {
                "switch_delay_seconds": 30,
                "bake_seconds": 60,
                "scale_down_delay_seconds": 30,
                **blue_green,
            }
            strategy = {"BlueGreen": params}
        submitted = await self.submit(commit, strategy)
        if not wait:
            return submitted
        return await self.wait(submitted["id"])

    async def first(self) -> str:
        """A first (blue-green) deployment; returns its revision."""
        d = await self.deploy("aaaa1111", {"BlueGreen": {"switch_delay_seconds": 0}})
        assert d["status"] == "Success", d.get("error")
        return str(d["green_revision"])

    async def wait(self, deployment_id: str) -> Doc:
        """The final record, once the task driving it has also let go of the service (its
        locks and lease go after the final status is saved): a reconciler pass the test runs
        next is not skipped as "a deployment is driving it"."""
        record = await self.pipeline.wait(deployment_id)
        task = self.pipeline._tasks.get(deployment_id)
        if task is not None:
            await asyncio.wait({task})
        return doc(record)

    async def rollback(self, deployment_id: str, user: str = "bob") -> Doc:
        return doc(await self.pipeline.rollback(deployment_id, user))

    async def promote(self, deployment_id: str, user: str = "bob") -> Doc:
        return doc(await self.pipeline.promote(deployment_id, user))

    async def abort(self, deployment_id: str, user: str = "carol") -> Doc:
        return doc(await self.pipeline.abort(deployment_id, user))

    async def until(self, deployment_id: str, test: str | Callable[[Doc], bool]) -> Doc:
        """Wait until the deployment's stored document passes ``test`` (a status, or a
        predicate); AssertionError if it ends first without passing."""
        check = (lambda d: d["status"] == test) if isinstance(test, str) else test
        changed = self.astore.changed
        async with changed:
            while True:
                current = self.store.get_deployment(deployment_id)
                if check(current):
                    return current
                if current["status"] in ("Success", "Failed", "RolledBack"):
                    raise AssertionError(
                        f"deployment ended {current['status']} without reaching {test}"
                    )
                await changed.wait()

    def revision(self, commit: str, d: Doc) -> str:
        return f"{commit[:7]}-{d['id'][:8]}"

    # --- the data plane ----------------------------------------------------------------------

    def weights(self) -> dict[str, int]:
        return self.runtime.services["api"].weights

    def history(self) -> list[dict[str, int]]:
        """Every weight change accepted for the service, in order."""
        return [w for s, w in self.runtime.router.history if s == "api"]

    def profile(self, revision: str, error_rate: float = 0.0, latency_ms: float = 2.0) -> None:
        self.runtime.router.profiles[revision] = TrafficProfile(error_rate, latency_ms)

    async def events(self, deployment_id: str) -> list[Any]:
        return list(await self.audit.records(deployment_id=deployment_id))


def progressive(replicas: int = 1) -> str:
    return PROGRESSIVE.format(replicas=replicas)


def doc(record: DeploymentRecord | RollbackRecord) -> Doc:
    """A record as the store keeps it (JSON)."""
    return dump_record(record)


def crash_when_persisted(world: PipelineWorld, status: str) -> asyncio.Event:
    """Kill the pipeline's task right after it persists ``status`` (what kill -9 does to a
    control plane between two actions); the event is set when that happened. Writes made by
    the test's own task (a ``promote``, say) never crash it."""
    crashed = asyncio.Event()
    save = world.astore.save_deployment
    test = asyncio.current_task()

    async def save_then_die(doc: dict[str, Any], *, active: bool) -> None:
        await save(doc, active=active)
        if doc["status"] == status and not crashed.is_set() and asyncio.current_task() is not test:
            crashed.set()
            raise asyncio.CancelledError  # the task dies here, with nothing more written

    world.astore.save_deployment = save_then_die  # type: ignore[method-assign]
    return crashed


async def restart(world: PipelineWorld) -> None:
    """Stop the control plane (nothing is rolled back) and start a new one on the same store."""
    await world.pipeline.stop()
    world.astore.__dict__.pop("save_deployment", None)  # no more crashes
    world.pipeline = world.new_pipeline()
    await world.pipeline.start()
