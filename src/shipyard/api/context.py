"""The composition root: builds the store, audit log, runtimes, builder and pipeline for a server.

``create_app`` calls ``build_context`` in its lifespan (unless a test hands it a ready context made
of fakes). Keeping the wiring here keeps routes thin and the core free of configuration.

Which directory each part gets is decided here: cluster-wide files (keys, the fleet PKI and
fleet.json, attestations, build logs, artifacts) under ``Settings.shared_dir``, which every
control-plane replica mounts; this replica's own (local agents, build workspaces and caches, the
audit anchor, the OSV cache) under ``Settings.data_dir``. Without ``--shared-dir`` both are the
data directory, the layout of a single control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from shipyard import tracing
from shipyard.api.auth import TokenAuthority
from shipyard.api.fleet import FleetListener, require_region, start_fleet_listener
from shipyard.api.fleet_artifacts import artifact_routes, recorded_artifacts
from shipyard.api.fleet_control import RegionService
from shipyard.api.tokens import TokenService
from shipyard.audit import AuditLog, SqlAuditLog
from shipyard.audit.checkpoint import CheckpointSigner
from shipyard.audit.publishing import CheckpointPublisher, parse_witness
from shipyard.build.image_export import ImageExporter
from shipyard.build.registry import BuildConfig, RegistryBuilder
from shipyard.domain.clock import SystemClock
from shipyard.health.probing import HttpProber
from shipyard.notify.delivery import CAP_SECONDS, DeliveryWorker
from shipyard.notify.sinks import OutboxWriter, SinkService
from shipyard.orchestrator.pipeline import Pipeline
from shipyard.private_files import ensure_private_dir
from shipyard.runtime.base import Runtime
from shipyard.runtime.local import LocalRuntime
from shipyard.security.app_secrets import AppSecrets
from shipyard.security.gate import SecurityGate
from shipyard.security.pki import FleetPki
from shipyard.security.sealing import Sealer
from shipyard.settings import Settings
from shipyard.store import leases
from shipyard.store.db import AsyncStore, Store
from shipyard.store.engine import open_engine
from shipyard.store.outbox import OutboxStore
from shipyard.store.regions import RegionStore
from shipyard.store.secrets import SecretStore
from shipyard.store.tokens import TokenStore


@dataclass
class AppContext:
    settings: Settings
    store: AsyncStore
    audit: AuditLog
    pipeline: Pipeline
    tokens: TokenService
    runtimes: dict[str, Runtime]
    closers: list[Any] = field(default_factory=list)
    #: Remote regions (api/fleet_control.py); made on first use when a test's context has none.
    regions: RegionService | None = None
    #: App secrets (api/secrets.py), the same object as the pipeline's ``Deps.secrets``.
    secrets: AppSecrets | None = None
    #: Notification sinks (api/notifications.py); None in a test's context made of fakes.
    notifications: SinkService | None = None

    def region_service(self) -> RegionService:
        """The region registry over this context's store, audit log and runtimes."""
        if self.regions is None:
            self.regions = RegionService(
                RegionStore(self.store.sync.engine),
                FleetPki.for_data_dir(self.settings.shared_dir, self.settings.data_dir),
                self.audit,
                self.store.sync,
                shared_dir=self.settings.shared_dir,
                local_regions=self.settings.regions,
                runtimes=self.runtimes,
                cert_ttl_seconds=self.settings.fleet_cert_ttl_seconds,
            )
        return self.regions

    def secret_service(self) -> AppSecrets:
        """The services' secrets; a test's context without them gets them on first use, over
        its store, audit log and ``shared_dir``'s key (and its pipeline gets the same)."""
        if self.secrets is None:
            self.secrets = AppSecrets(
                SecretStore(self.store.sync.engine),
                Sealer.for_dir(self.settings.shared_dir),
                self.audit,
            )
            if self.pipeline.deps.secrets is None:
                self.pipeline.deps.secrets = self.secrets
        return self.secrets

    async def aclose(self) -> None:
        await self.pipeline.stop()
        for c in self.closers:
            await c()
        if self.regions is not None:
            await self.regions.aclose()


async def build_context(settings: Settings) -> AppContext:
    ensure_private_dir(settings.shared_dir)  # the keys' directory: 0700
    engine = await asyncio.to_thread(open_engine, settings.database, settings.data_dir)
    store = AsyncStore(Store(engine))
    outbox_writer = OutboxWriter(SystemClock().now)
    audit = SqlAuditLog(
        engine,
        settings.audit_anchor,
        fence=leases.check_fence,
        on_append=outbox_writer.on_append,  # notifications commit with their audit record
    )
    runtimes: dict[str, Runtime] = {}
    closers: list[Any] = []
    for region in settings.regions:
        rt = await LocalRuntime.connect(settings.data_dir, region)
        runtimes[region] = rt
        closers.append(rt.aclose)
    prober = HttpProber()
    closers.append(prober.aclose)
    checkpoints = _checkpoint_publisher(settings, audit, outbox_writer)
    if checkpoints is not None:
        closers.append(checkpoints.aclose)
    shared = settings.shared_dir
    build_config = BuildConfig(
        data_dir=settings.data_dir,
        shared_dir=shared,
        sandbox=settings.sandbox_policy,
        builders=settings.builder_settings,
    )
    # OTEL_* of serve's environment (checked by the CLI first): spans exported in batches,
    # flushed when the server stops (after the pipeline: its last spans go too).
    traced = tracing.configure(os.environ)

    async def flush_traces() -> None:
        await asyncio.to_thread(traced.shutdown)  # a last export may wait on the collector

    closers.append(flush_traces)
    # Sealed with <shared_dir>/keys/secrets.key: every replica sharing the directory opens them.
    secrets = AppSecrets(SecretStore(engine), Sealer.for_dir(shared), audit)
    pipeline = Pipeline(
        store=store,
        audit=audit,
        builder=RegistryBuilder(build_config),
        runtimes=runtimes,
        prober=prober,
        clock=SystemClock(),
        # The signing key is the cluster's; the OSV cache this replica's own.
        gate=SecurityGate(
            data_dir=shared,
            db_path=settings.osv_db,
            cache_dir=settings.data_dir / "cache" / "osv",
        ),
        attestations_dir=shared / "attestations",
        logs_dir=shared / "deployments",
        drain_timeout=settings.drain_timeout_seconds,
        four_eyes=settings.four_eyes,
        checkpoints=checkpoints,
        max_concurrent_builds=settings.max_concurrent_builds,
        max_build_log_bytes=settings.max_build_log_bytes,
        log_retention=settings.log_retention,
        builder_logs_dir=shared / "logs",
        source_policy=settings.source_policy,
        # Images are scanned through the engine that built them (the docker builder's).
        image_exporter=ImageExporter.from_build_config(build_config),
        replica_id=settings.replica_id or socket.gethostname(),
        lease_seconds=settings.lease_seconds,
        tracer=traced.tracer,
        secrets=secrets,
    )
    closers.append(_dispose(engine))
    token_store = TokenStore(engine)
    # Published so `shipyard token create` (another process) refuses what this server would.
    token_store.set_max_ttl_seconds(settings.max_token_ttl_seconds)
    tokens = TokenService(
        TokenAuthority.from_data_dir(shared, max_ttl_seconds=settings.max_token_ttl_seconds),
        token_store,
        audit,
    )
    context = AppContext(
        settings, store, audit, pipeline, tokens, runtimes, closers, secrets=secrets
    )
    context.notifications = await _start_notifications(context, engine)
    await _start_fleet(context)
    return context


async def _start_notifications(context: AppContext, engine: Any) -> SinkService:
    """The sinks (``serve --config``'s replace the previous file's) and this replica's delivery
    worker, a task of its own: a deployment only ever inserts outbox rows."""
    settings = context.settings
    clock = SystemClock()
    sinks = SinkService(OutboxStore(engine), Sealer.for_dir(settings.shared_dir), clock.now)
    config = settings.server_config
    if config is not None:
        await asyncio.to_thread(sinks.apply_config, config.sinks)
    worker = DeliveryWorker(
        sinks.outbox,
        sinks,
        clock,
        replica_id=settings.replica_id or socket.gethostname(),
        cap_seconds=config.retry_cap_seconds if config is not None else CAP_SECONDS,
    )
    task = asyncio.get_running_loop().create_task(worker.run())

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await worker.aclose()

    # Stopped after the pipeline (closers run in order, the pipeline first): its last events'
    # rows are in the outbox and go out after the restart if not before.
    context.closers.insert(0, stop)
    return sinks


#: Seconds between two ``RegionService.sync_runtimes`` passes (a ``shipyard region remove``
#: from another process stops this server dialing the region within this).
REGION_SYNC_SECONDS = 5.0


async def _start_fleet(context: AppContext) -> None:
    """Joined regions into ``runtimes`` (one that does not answer does not stop the start),
    their re-sync every few seconds, and the fleet listener with ``--fleet-listen``."""
    regions = context.region_service()
    await regions.sync_runtimes()
    listener: FleetListener | None = None

    async def resync() -> None:
        while True:
            await asyncio.sleep(REGION_SYNC_SECONDS)
            try:
                await regions.sync_runtimes()
                if listener is not None:
                    await listener.refresh()
            except Exception:
                logging.getLogger("shipyard.api.context").exception("region sync failed")

    task = asyncio.get_running_loop().create_task(resync())

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    context.closers.insert(0, stop)
    if context.settings.fleet_listen is not None:
        listener = await start_fleet_listener(
            regions,
            context.settings,
            # The fleet app's routes beyond join/renew/ca: joined agents fetch directory
            # artifacts by digest (only recorded ones, from the builder's own store).
            extra_routers=[
                artifact_routes(
                    recorded_artifacts(context.store, context.settings.shared_dir / "artifacts"),
                    require_region,
                )
            ],
        )
        context.closers.insert(0, listener.aclose)


def _checkpoint_publisher(
    settings: Settings, audit: SqlAuditLog, outbox_writer: OutboxWriter
) -> CheckpointPublisher | None:
    """The audit checkpoint publisher for ``--witness``, or None without one."""
    if not settings.witnesses:
        return None
    return CheckpointPublisher(
        engine=audit.engine,
        signer=CheckpointSigner.load_or_create(settings.shared_dir),
        witnesses=[
            parse_witness(w, settings.data_dir, settings.witness_history)
            for w in settings.witnesses
        ],
        clock=SystemClock(),
        interval=settings.checkpoint_interval_seconds,
        on_publish=outbox_writer.on_publish,
    )


def _dispose(engine: Any) -> Any:
    async def close() -> None:
        engine.dispose()

    return close
