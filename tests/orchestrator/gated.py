"""A region's fake data plane behind a gate, for fleet tests: every call is logged (region, call,
begin/end) in one list shared by the fleet's regions, so a test reads the order in which regions
were told things; a region can be made to stop answering (``hang``: calls block, before or after
they took effect, as an agent that is SIGSTOPped or whose answers are lost) and to answer again
(``answer``); a call can take a while on the injected clock (``delays``), which makes a switch's
skew a known number.

``GatedRuntime`` keeps the ``Runtime`` contract by delegating to a ``FakeRuntime``; used by
tests/orchestrator/test_fleet.py through ``PipelineWorld.runtimes``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

from shipyard.domain.clock import Clock
from shipyard.runtime.base import (
    HookResult,
    HookRun,
    LogBatch,
    LogQuery,
    ReplicaStatus,
    RevisionSpec,
    ServiceState,
    StickyKey,
)
from shipyard.runtime.fake import FakeRuntime

T = TypeVar("T")
#: (region, call, "begin" | "end" | "cancelled")
CallLog = list[tuple[str, str, str]]


class GatedRuntime:
    kind = "fake"
    artifact_kinds: tuple[str, ...] = ("directory", "oci-image")

    def __init__(self, inner: FakeRuntime, log: CallLog, clock: Clock) -> None:
        self.inner = inner
        self.region = inner.region
        self.log = log
        self.clock = clock
        self._open = asyncio.Event()
        self._open.set()
        #: Calls that block while hung (None: every call).
        self._hung_calls: set[str] | None = None
        self._hang_when: Literal["before", "after"] = "before"
        #: Call name -> seconds it takes on the clock before it answers.
        self.delays: dict[str, float] = {}
        self.router = GatedRouter(self)

    def hang(
        self, calls: Sequence[str] | None = None, when: Literal["before", "after"] = "before"
    ) -> None:
        """Stop answering ``calls`` (None: all): ``before`` they act, or ``after`` (the change
        is made, the answer never comes)."""
        self._hung_calls = set(calls) if calls is not None else None
        self._hang_when = when
        self._open.clear()

    def answer(self) -> None:
        """Answer again (calls blocked so far go on)."""
        self._open.set()

    def _gated(self, name: str) -> bool:
        return not self._open.is_set() and (self._hung_calls is None or name in self._hung_calls)

    async def call(self, name: str, fn: Callable[[], Awaitable[T]]) -> T:
        self.log.append((self.region, name, "begin"))
        try:
            if self._gated(name) and self._hang_when == "before":
                await self._open.wait()
            if name in self.delays:
                await self.clock.sleep(self.delays[name])
            result = await fn()
            if self._gated(name) and self._hang_when == "after":
                await self._open.wait()
        except asyncio.CancelledError:
            self.log.append((self.region, name, "cancelled"))
            raise
        self.log.append((self.region, name, "end"))
        return result

    async def ensure_service(self, service: str) -> str:
        return await self.call("ensure_service", lambda: self.inner.ensure_service(service))

    async def start_revision(self, spec: RevisionSpec) -> list[ReplicaStatus]:
        return await self.call("start_revision", lambda: self.inner.start_revision(spec))

    async def set_routable(self, service: str, replica_ids: Sequence[str], routable: bool) -> None:
        await self.call(
            "set_routable", lambda: self.inner.set_routable(service, replica_ids, routable)
        )

    async def stop_replicas(
        self, service: str, replica_ids: Sequence[str], *, drain_timeout: float = 30.0
    ) -> None:
        await self.call(
            "stop_replicas",
            lambda: self.inner.stop_replicas(service, replica_ids, drain_timeout=drain_timeout),
        )

    async def stop_revision(
        self, service: str, revision: str, *, drain_timeout: float = 30.0
    ) -> None:
        await self.call(
            "stop_revision",
            lambda: self.inner.stop_revision(service, revision, drain_timeout=drain_timeout),
        )

    async def service_state(self, service: str) -> ServiceState | None:
        return await self.call("service_state", lambda: self.inner.service_state(service))

    async def read_logs(self, service: str, query: LogQuery) -> LogBatch:
        return await self.call("read_logs", lambda: self.inner.read_logs(service, query))

    async def list_services(self) -> list[str]:
        return await self.call("list_services", self.inner.list_services)

    async def run_hook(
        self, spec: RevisionSpec, hook: HookRun, on_output: Callable[[str], None]
    ) -> HookResult:
        return await self.call("run_hook", lambda: self.inner.run_hook(spec, hook, on_output))


class GatedRouter:
    type = "fake"

    def __init__(self, runtime: GatedRuntime) -> None:
        self.rt = runtime
        self.inner = runtime.inner.router

    async def set_weight(
        self, service: str, weights: Mapping[str, int], *, sticky: StickyKey | None = None
    ) -> None:
        await self.rt.call(
            "set_weight", lambda: self.inner.set_weight(service, weights, sticky=sticky)
        )

    async def verify_weight(self, service: str, weights: Mapping[str, int]) -> bool | None:
        return await self.rt.call(
            "verify_weight", lambda: self.inner.verify_weight(service, weights)
        )

    async def remove_managed_routes(self, service: str) -> None:
        await self.rt.call(
            "remove_managed_routes", lambda: self.inner.remove_managed_routes(service)
        )

    async def metrics(self, service: str) -> Mapping[str, Mapping[str, Any]]:
        return await self.rt.call("metrics", lambda: self.inner.metrics(service))
