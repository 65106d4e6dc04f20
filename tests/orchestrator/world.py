"""The fake world every orchestrator test drives: the real ``Pipeline`` and SQLite store over a
fake runtime/router (optionally with synthetic load), scripted health, a fake builder, an
in-memory audit log and a ``FakeClock``. ``test_pipeline.World`` and ``progressive.World`` add
their own ways to submit deployments."""

from __future__ import annotations

from pathlib import Path

from shipyard.audit import MemoryAuditLog
from shipyard.build.fake import FakeBuilder
from shipyard.domain.clock import FakeClock
from shipyard.health.fake import FakeProber
from shipyard.orchestrator.pipeline import Pipeline
from shipyard.runtime.fake import FakeRuntime
from shipyard.store.db import Store, make_engine


class PipelineWorld:
    def __init__(self, tmp: Path, *, builder: FakeBuilder | None = None, rps: float = 0.0) -> None:
        self.clock = FakeClock()
        self.runtime = FakeRuntime("local", now=self.clock.now)
        self.runtime.router.rps = rps  # synthetic requests per second through every service
        self.prober = FakeProber()
        self.builder = builder or FakeBuilder()
        self.audit = MemoryAuditLog(clock=self.clock.now)
        self.store = Store(make_engine(tmp))
        self.pipeline = self.new_pipeline()

    def new_pipeline(self) -> Pipeline:
        """A fresh control plane over the same store and data plane (a restart)."""
        return Pipeline(
            store=self.store,
            audit=self.audit,
            builder=self.builder,
            runtimes={"local": self.runtime},
            prober=self.prober,
            clock=self.clock,
        )

    def weights(self) -> dict[str, int]:
        return self.runtime.services["api"].weights

    def history(self) -> list[dict[str, int]]:
        """Every weight change accepted for the service, in order."""
        return [w for s, w in self.runtime.router.history if s == "api"]
