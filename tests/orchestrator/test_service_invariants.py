"""Property: whatever users and time do, the revision the store says serves really serves.

Hypothesis draws random sequences of deploy (healthy or failing its bake), canary with a gate
(promoted or aborted), rollback of any deployment, janitor ticks (time passing, warm windows
ending, a reconciler pass) and control-plane restarts (between actions, or in the middle of a
deployment at a random persisted status), all on the fake world. After every action, with no
deployment in flight:

- the service record is consistent: the serving revision is never also warm;
- the serving revision has running, routable replicas and 100% of the weight;
- the warm revision, if any, is running (an instant rollback to it must be possible);
- nothing the store does not know about runs (no orphans).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shipyard.errors import Conflict
from tests.orchestrator.world import PipelineWorld, crash_when_persisted, restart

Action = tuple[Any, ...]

actions = st.one_of(
    st.tuples(
        st.just("deploy"),
        st.sampled_from([0, 5]),  # bake seconds
        st.sampled_from([0, 10, 60]),  # scale-down delay (warm window)
    ),
    st.tuples(st.just("deploy_bad")),
    st.tuples(st.just("canary"), st.sampled_from(["promote", "abort"])),
    st.tuples(st.just("rollback"), st.integers(min_value=0, max_value=20)),
    st.tuples(st.just("tick"), st.sampled_from([1.0, 11.0, 61.0])),
    st.tuples(st.just("restart")),
    st.tuples(
        st.just("crash_at"),
        st.sampled_from(["Building", "Deploying", "Switching", "Baking", "RollingBack"]),
    ),
)


class Scenario:
    def __init__(self, tmp: Path) -> None:
        self.world = PipelineWorld(tmp, replicas=1, rps=100.0)
        self.n = 0
        self.succeeded: list[str] = []

    def commit(self) -> str:
        self.n += 1
        return f"{self.n:04x}abcd"

    async def run(self, steps: list[Action]) -> None:
        await self.world.pipeline.start()
        try:
            for step in steps:
                await self.act(step)
                await self.check(step)
        finally:
            await self.world.pipeline.stop()

    async def act(self, step: Action) -> None:
        w = self.world
        match step:
            case ("deploy", bake, warm):
                await self.deploy({"BlueGreen": _bg(bake, warm)})
            case ("deploy_bad",):
                commit = self.commit()
                doc = await w.submit(commit, {"BlueGreen": _bg(10, 30)})
                # Healthy through the gate (2 probes), failing in the bake window.
                w.prober.scripts[w.revision(commit, doc)] = lambda r, n: n < 3
                await self.finish(doc)
            case ("canary", verdict):
                stages = [{"weight": 20, "duration_seconds": 30, "pause": True}, {"weight": 60}]
                doc = await w.submit(
                    self.commit(), {"Canary": {"stages": stages, "scale_down_delay_seconds": 10}}
                )
                if await self._reaches(doc["id"], "Paused"):
                    if verdict == "promote":
                        await w.promote(doc["id"], "bob")
                    else:
                        await w.abort(doc["id"], "bob")
                await self.finish(doc)
            case ("rollback", index):
                if not self.succeeded:
                    return
                target = self.succeeded[index % len(self.succeeded)]
                try:
                    doc = await w.rollback(target, "bob")
                except Conflict:
                    return  # first deployment, already undone, or already serving
                await self.finish(doc)
            case ("tick", seconds):
                await w.clock.sleep(seconds)
                await w.pipeline.retire_expired()
                await w.pipeline.reconcile_data_planes()
            case ("restart",):
                await self.restart()
            case ("crash_at", status):
                crashed = crash_when_persisted(w, status)
                commit = self.commit()
                doc = await w.submit(commit, {"BlueGreen": _bg(5, 10)})
                if status == "RollingBack":
                    w.prober.scripts[w.revision(commit, doc)] = lambda r, n: n < 3
                done = asyncio.ensure_future(w.wait(doc["id"]))
                died = asyncio.ensure_future(crashed.wait())
                await asyncio.wait([done, died], return_when=asyncio.FIRST_COMPLETED)
                done.cancel()
                died.cancel()
                await self.restart()
                await self.finish(doc)

    async def _reaches(self, deployment_id: str, status: str) -> bool:
        try:
            await self.world.until(deployment_id, status)
        except AssertionError:  # it ended first (e.g. refused before its gate)
            return False
        return True

    async def deploy(self, strategy: dict[str, Any]) -> None:
        doc = await self.world.submit(self.commit(), strategy)
        await self.finish(doc)

    async def finish(self, doc: dict[str, Any]) -> None:
        final = await self.world.wait(doc["id"])
        assert final["status"] in ("Success", "Failed", "RolledBack"), final["status"]
        if final["status"] == "Success" and final["kind"] == "deploy":
            self.succeeded.append(final["id"])

    async def restart(self) -> None:
        await restart(self.world)

    async def check(self, step: Action) -> None:
        w = self.world
        assert w.store.active_deployments() == [], step
        svc = w.store.get_service("api", "local")
        if svc is None or svc.serving_revision is None:
            return
        serving = svc.serving_revision
        assert svc.warm_revision != serving, step
        state = w.runtime.services["api"]
        ready = [r for r in state.replicas.values() if r.revision == serving and r.alive]
        assert ready and all(r.routable for r in ready), (step, state.replicas)
        assert {k: v for k, v in state.weights.items() if v} == {serving: 100}, step
        running = w.runtime.running_revisions("api")
        if svc.warm_revision:
            assert svc.warm_revision in running, step
        assert running <= {serving, svc.warm_revision}, (step, running)


def _bg(bake: float, warm: float) -> dict[str, Any]:
    return {"switch_delay_seconds": 0, "bake_seconds": bake, "scale_down_delay_seconds": warm}


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(actions, min_size=1, max_size=10))
def test_the_serving_revision_always_serves(steps: list[Action]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(Scenario(Path(tmp)).run(steps))
