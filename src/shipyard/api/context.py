"""The composition root: builds the store, audit log, runtimes, builder and pipeline for a server.

``create_app`` calls ``build_context`` in its lifespan (unless a test hands it a ready context made
of fakes). Keeping the wiring here keeps routes thin and the core free of configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shipyard.api.auth import TokenAuthority
from shipyard.api.tokens import TokenService
from shipyard.audit import AuditLog, SqlAuditLog
from shipyard.audit.checkpoint import CheckpointSigner
from shipyard.audit.publishing import CheckpointPublisher, parse_witness
from shipyard.build.image_export import ImageExporter
from shipyard.build.registry import BuildConfig, RegistryBuilder
from shipyard.domain.clock import SystemClock
from shipyard.health.probing import HttpProber
from shipyard.orchestrator.pipeline import Pipeline
from shipyard.runtime.base import Runtime
from shipyard.runtime.local import LocalRuntime
from shipyard.security.gate import SecurityGate
from shipyard.settings import Settings
from shipyard.store.db import AsyncStore, Store, make_engine
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

    async def aclose(self) -> None:
        await self.pipeline.stop()
        for c in self.closers:
            await c()


async def build_context(settings: Settings) -> AppContext:
    engine = make_engine(settings.data_dir)
    store = AsyncStore(Store(engine))
    audit = SqlAuditLog(engine, settings.audit_anchor)
    runtimes: dict[str, Runtime] = {}
    closers: list[Any] = []
    for region in settings.regions:
        rt = await LocalRuntime.connect(settings.data_dir, region)
        runtimes[region] = rt
        closers.append(rt.aclose)
    prober = HttpProber()
    closers.append(prober.aclose)
    checkpoints = _checkpoint_publisher(settings, audit)
    if checkpoints is not None:
        closers.append(checkpoints.aclose)
    build_config = BuildConfig(data_dir=settings.data_dir, sandbox=settings.sandbox_policy)
    pipeline = Pipeline(
        store=store,
        audit=audit,
        builder=RegistryBuilder(build_config),
        runtimes=runtimes,
        prober=prober,
        clock=SystemClock(),
        gate=SecurityGate(data_dir=settings.data_dir, db_path=settings.osv_db),
        attestations_dir=settings.data_dir / "attestations",
        logs_dir=settings.data_dir / "deployments",
        drain_timeout=settings.drain_timeout_seconds,
        four_eyes=settings.four_eyes,
        checkpoints=checkpoints,
        max_concurrent_builds=settings.max_concurrent_builds,
        max_build_log_bytes=settings.max_build_log_bytes,
        log_retention=settings.log_retention,
        builder_logs_dir=settings.data_dir / "logs",
        source_policy=settings.source_policy,
        # Images are scanned through the engine that built them (the docker builder's).
        image_exporter=ImageExporter.from_build_config(build_config),
    )
    closers.append(_dispose(engine))
    token_store = TokenStore(engine)
    # Published so `shipyard token create` (another process) refuses what this server would.
    token_store.set_max_ttl_seconds(settings.max_token_ttl_seconds)
    tokens = TokenService(
        TokenAuthority.from_data_dir(
            settings.data_dir, max_ttl_seconds=settings.max_token_ttl_seconds
        ),
        token_store,
        audit,
    )
    return AppContext(settings, store, audit, pipeline, tokens, runtimes, closers)


def _checkpoint_publisher(settings: Settings, audit: SqlAuditLog) -> CheckpointPublisher | None:
    """The audit checkpoint publisher for ``--witness``, or None without one."""
    if not settings.witnesses:
        return None
    return CheckpointPublisher(
        engine=audit.engine,
        signer=CheckpointSigner.load_or_create(settings.data_dir),
        witnesses=[
            parse_witness(w, settings.data_dir, settings.witness_history)
            for w in settings.witnesses
        ],
        clock=SystemClock(),
        interval=settings.checkpoint_interval_seconds,
    )


def _dispose(engine: Any) -> Any:
    async def close() -> None:
        engine.dispose()

    return close
