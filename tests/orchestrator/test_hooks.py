"""``[hooks]`` through the real pipeline on fakes: where each point runs in every strategy's plan,
what a failure at each point does to the deployment, and what is recorded (stage, audit, log).

The fake runtime records every hook it ran with what was running and serving at that moment
(``FakeRuntime.hooks``), and answers the exit code a test scripts for the point.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.build.fake import FakeBuilder
from shipyard.cli.watch import stage_views
from shipyard.domain.manifest import parse_manifest
from tests.orchestrator.world import PipelineWorld, progressive

HOOKS = """
[hooks.pre_deploy]
command = ["python3", "manage.py", "migrate"]
timeout_seconds = 120
[hooks]
pre_switch = "python3 smoke.py"
post_switch = "python3 announce.py"
post_rollback = "python3 cleanup.py"
"""

STRATEGIES: dict[str, dict[str, Any]] = {
    "blue-green": {"BlueGreen": {"switch_delay_seconds": 0}},
    "canary": {
        "Canary": {
            "stages": [{"weight": 10, "duration_seconds": 60}],
            "scale_down_delay_seconds": 0,
        }
    },
    "rolling": {"Rolling": {"max_surge": 1, "max_unavailable": 0}},
}


def manifest(hooks: str = HOOKS, replicas: int = 2) -> str:
    # [hooks] tables after the base manifest; the [routing] table it ends with stays intact.
    return progressive(replicas) + hooks


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PipelineWorld]:
    w = PipelineWorld(tmp_path, builder=FakeBuilder(manifest=parse_manifest(manifest(""))))
    for fake in w.fakes.values():
        fake.router.rps = 100.0
    w.pipeline.deps.logs_dir = tmp_path / "deployments"
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()


def with_hooks(world: PipelineWorld, hooks: str = HOOKS) -> None:
    """The next deployments build a manifest with these hooks."""
    world.builder.manifest = parse_manifest(manifest(hooks))


def stage(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in doc["stages"] if s["name"] == name)


def names(doc: dict[str, Any]) -> list[str]:
    return [s["name"] for s in doc["stages"]]


async def audited(world: PipelineWorld, deployment_id: str, kind: str) -> list[dict[str, Any]]:
    return [dict(e.detail) for e in await world.events(deployment_id) if e.event_type == kind]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
async def test_hooks_run_once_each_at_their_points(world: PipelineWorld, strategy: str) -> None:
    stable = await world.first()
    with_hooks(world)
    doc = await world.deploy("bbbb2222", STRATEGIES[strategy])
    assert doc["status"] == "Success", doc.get("error")
    green = doc["green_revision"]
    calls = world.runtime.hooks
    assert [c.hook.point for c in calls] == ["pre_deploy", "pre_switch", "post_switch"]
    pre_deploy, pre_switch, post_switch = calls
    # pre_deploy: before any replica of the candidate started; stable serves everything.
    assert green not in pre_deploy.running
    assert pre_deploy.weights == {stable: 100}
    # pre_switch: before the candidate's first traffic (a blue-green or canary candidate is
    # started and healthy by then; a rolling update starts its first batch after it).
    assert pre_switch.weights == {stable: 100}
    assert (green in pre_switch.running) is (strategy != "rolling")
    # post_switch: the candidate serves 100%.
    assert post_switch.weights == {green: 100}
    # Each in the candidate's artifact, with the replicas' environment, its own argv.
    spec = world.runtime.specs[green]
    for call in calls:
        assert call.spec.revision == green
        assert call.spec.artifact_digest == spec.artifact_digest
        assert call.spec.env == spec.env
    assert list(pre_deploy.hook.argv) == ["python3", "manage.py", "migrate"]
    assert pre_deploy.hook.timeout_seconds == 120
    assert list(pre_switch.hook.argv) == ["python3", "smoke.py"]
    order = names(doc)
    assert order.index("hook_pre_deploy") < order.index("hook_pre_switch")
    assert order.index("hook_pre_switch") < order.index("hook_post_switch")
    assert order[-1] == "hook_post_switch" or order.index("hook_post_switch") > order.index(
        "hook_pre_switch"
    )
    for point in ("pre_deploy", "pre_switch", "post_switch"):
        st = stage(doc, f"hook_{point}")
        assert st["status"] == "succeeded"
        assert st["detail"]["exit_code"] == 0
        assert st["detail"]["duration_ms"] == 5
    assert "hook_post_rollback" not in order


async def test_a_succeeded_hook_is_audited_without_its_output_which_goes_to_the_log(
    world: PipelineWorld,
) -> None:
    await world.first()
    with_hooks(world, '[hooks]\npre_deploy = "python3 manage.py migrate"\n')
    world.runtime.hook_output["pre_deploy"] = ["Applying 0001_initial... OK", "secret-ish line"]
    doc = await world.deploy("bbbb2222")
    assert doc["status"] == "Success", doc.get("error")
    [event] = await audited(world, doc["id"], "hook.succeeded")
    assert {k: event[k] for k in ("point", "command", "exit_code", "duration_ms")} == {
        "point": "pre_deploy",
        "command": "python3 manage.py migrate",
        "exit_code": 0,
        "duration_ms": 5,
    }
    every_event = json.dumps([dict(e.detail) for e in await world.events(doc["id"])])
    assert "Applying 0001_initial" not in every_event
    log = world.pipeline.build_log_path(doc["id"])
    assert log is not None
    lines = log.read_text().splitlines()
    assert "[hook pre_deploy] Applying 0001_initial... OK" in lines
    assert "[hook pre_deploy] $ python3 manage.py migrate" in lines
    assert lines[-1].startswith("[hook pre_deploy] exited with code 0")


async def test_a_failing_pre_deploy_ends_failed_with_nothing_changed(world: PipelineWorld) -> None:
    stable = await world.first()
    started_before = list(world.runtime.started)
    with_hooks(world)
    world.runtime.hook_exit["pre_deploy"] = 3
    world.runtime.hook_output["pre_deploy"] = ["migrating...", "django.db.utils.Error: boom"]
    doc = await world.deploy("bbbb2222")
    assert doc["status"] == "Failed"
    assert doc["error"]["code"] == "hook_failed"
    assert doc["error"]["exit_code"] == 3
    assert doc["error"]["point"] == "pre_deploy"
    assert "django.db.utils.Error: boom" in doc["error"]["message"]
    # Nothing changed: no candidate replica ever started, stable serves alone, no rollback.
    assert world.runtime.started == started_before
    assert world.weights() == {stable: 100}
    assert "rollback" not in names(doc)
    assert "start" not in names(doc)
    assert doc["rollback_count"] == 0
    assert [c.hook.point for c in world.runtime.hooks] == ["pre_deploy"]  # no post_rollback
    st = stage(doc, "hook_pre_deploy")
    assert st["status"] == "failed"
    assert st["detail"]["exit_code"] == 3
    [failed] = await audited(world, doc["id"], "hook.failed")
    assert failed["point"] == "pre_deploy"
    assert failed["exit_code"] == 3
    assert failed["command"] == "python3 manage.py migrate"
    assert "boom" not in json.dumps(failed)
    svc = world.store.get_service("api", "local")
    assert svc is not None and svc.serving_revision == stable


async def test_a_pre_deploy_that_cannot_start_also_ends_failed(world: PipelineWorld) -> None:
    stable = await world.first()
    with_hooks(world)
    world.runtime.hook_fail_start.add("pre_deploy")
    doc = await world.deploy("bbbb2222")
    assert doc["status"] == "Failed"
    assert doc["error"]["code"] == "revision_start_failed"
    assert world.weights() == {stable: 100}
    assert "rollback" not in names(doc)
    assert stage(doc, "hook_pre_deploy")["status"] == "failed"


async def test_an_abort_during_pre_deploy_ends_failed_with_nothing_changed(
    world: PipelineWorld,
) -> None:
    stable = await world.first()
    with_hooks(world)
    world.runtime.hook_running["pre_deploy"] = asyncio.Event()  # never set: it runs on
    submitted = await world.submit("bbbb2222", STRATEGIES["blue-green"])
    await world.until(submitted["id"], lambda d: "hook_pre_deploy" in names(d))
    await world.abort(submitted["id"])
    doc = await world.wait(submitted["id"])
    assert doc["status"] == "Failed"
    assert doc["error"]["code"] == "deployment_aborted"
    assert world.weights() == {stable: 100}
    assert "rollback" not in names(doc)
    st = stage(doc, "hook_pre_deploy")
    assert st["status"] == "failed"  # not left running
    assert "aborted by" in st["detail"]["error"]


async def test_status_shows_a_running_hook_once_and_the_hooks_to_come(
    world: PipelineWorld,
) -> None:
    await world.first()
    with_hooks(world)
    world.runtime.hook_running["pre_deploy"] = release = asyncio.Event()
    submitted = await world.submit("bbbb2222", STRATEGIES["blue-green"])
    running = await world.until(submitted["id"], lambda d: "hook_pre_deploy" in names(d))
    views = [(v.name, v.status) for v in stage_views(running)]
    assert views[:2] == [("build", "succeeded"), ("hook_pre_deploy", "running")]
    pending = [name for name, status in views if status == "pending"]
    assert pending[0] == "start"
    assert "hook_pre_switch" in pending and "hook_post_switch" in pending
    assert "hook_pre_deploy" not in pending
    release.set()
    assert (await world.wait(submitted["id"]))["status"] == "Success"


async def test_a_timed_out_pre_deploy_says_so(world: PipelineWorld) -> None:
    await world.first()
    with_hooks(world)
    world.runtime.hook_exit["pre_deploy"] = None  # killed at its timeout
    doc = await world.deploy("bbbb2222")
    assert doc["status"] == "Failed"
    assert doc["error"]["timed_out"] is True
    assert "timeout_seconds (120 s)" in doc["error"]["message"]


async def test_a_failing_pre_switch_rolls_back_then_post_rollback_runs(
    world: PipelineWorld,
) -> None:
    stable = await world.first()
    with_hooks(world)
    world.runtime.hook_exit["pre_switch"] = 1
    doc = await world.deploy("bbbb2222")
    assert doc["status"] == "RolledBack", doc.get("error")
    green = doc["green_revision"]
    assert doc["error"]["code"] == "hook_failed"
    assert doc["error"]["point"] == "pre_switch"
    assert world.weights() == {stable: 100}
    assert green not in world.runtime.running_revisions("api")
    assert [c.hook.point for c in world.runtime.hooks] == [
        "pre_deploy",
        "pre_switch",
        "post_rollback",
    ]
    post = world.runtime.hooks[-1]
    # After the rollback: stable back at 100%, the candidate stopped; in its artifact.
    assert post.weights == {stable: 100}
    assert green not in post.running
    assert post.spec.revision == green
    order = names(doc)
    assert order.index("rollback") < order.index("hook_post_rollback")
    assert stage(doc, "hook_post_rollback")["status"] == "succeeded"
    assert doc["progress"]["post_rollback_ran"] is True


async def test_a_failing_post_switch_is_reported_and_the_deployment_succeeds(
    world: PipelineWorld,
) -> None:
    await world.first()
    with_hooks(world)
    world.runtime.hook_exit["post_switch"] = 2
    doc = await world.deploy("bbbb2222")
    assert doc["status"] == "Success", doc.get("error")
    assert doc["error"] is None
    assert world.weights() == {doc["green_revision"]: 100}
    st = stage(doc, "hook_post_switch")
    assert st["status"] == "failed"
    assert st["detail"]["exit_code"] == 2
    assert st["detail"]["fatal"] is False
    [failed] = await audited(world, doc["id"], "hook.failed")
    assert failed["point"] == "post_switch"
    assert failed["exit_code"] == 2


async def test_post_switch_with_on_failure_fail_rolls_back(world: PipelineWorld) -> None:
    stable = await world.first()
    with_hooks(world, '[hooks.post_switch]\ncommand = "python3 check.py"\non_failure = "fail"\n')
    world.runtime.hook_exit["post_switch"] = 1
    doc = await world.deploy("bbbb2222")
    assert doc["status"] == "RolledBack"
    assert doc["error"]["code"] == "hook_failed"
    assert world.weights() == {stable: 100}


async def test_a_failing_post_rollback_is_reported_and_still_rolled_back(
    world: PipelineWorld,
) -> None:
    stable = await world.first()
    with_hooks(world)
    world.runtime.hook_exit["pre_switch"] = 1
    world.runtime.hook_exit["post_rollback"] = 9
    doc = await world.deploy("bbbb2222")
    assert doc["status"] == "RolledBack"
    assert doc["error"]["point"] == "pre_switch"  # the cause stays the error
    assert stage(doc, "hook_post_rollback")["status"] == "failed"
    assert world.weights() == {stable: 100}
    points = [e["point"] for e in await audited(world, doc["id"], "hook.failed")]
    assert points == ["pre_switch", "post_rollback"]


async def test_a_fatal_post_rollback_failure_is_the_records_error(world: PipelineWorld) -> None:
    stable = await world.first()
    with_hooks(
        world,
        '[hooks]\npre_switch = "python3 smoke.py"\n'
        '[hooks.post_rollback]\ncommand = "python3 cleanup.py"\non_failure = "fail"\n',
    )
    world.runtime.hook_exit["pre_switch"] = 1
    world.runtime.hook_exit["post_rollback"] = 4
    doc = await world.deploy("bbbb2222")
    assert doc["status"] == "RolledBack"
    assert world.weights() == {stable: 100}
    assert doc["error"]["code"] == "hook_failed"
    assert doc["error"]["point"] == "post_rollback"
    assert doc["error"]["rolled_back_for"] == "hook_failed"
    assert "pre_switch hook exited with code 1" in doc["error"]["message"]


async def test_a_changed_artifact_is_refused_before_the_hook_runs(world: PipelineWorld) -> None:
    stable = await world.first()
    with_hooks(world)
    doc = await world.submit("bbbb2222", STRATEGIES["blue-green"])
    # Whatever the candidate's location, its content no longer hashes to its digest.
    world.runtime.artifact_digests = _Tampered()
    doc = await world.wait(doc["id"])
    assert doc["status"] == "Failed"
    assert doc["error"]["code"] == "artifact_verification_failed"
    assert world.runtime.hooks == []
    assert world.weights() == {stable: 100}


class _Tampered(dict[str, str]):
    def get(self, key: str, default: str | None = None) -> str:  # type: ignore[override]
        return "sha256:tampered"


async def test_a_finished_hook_is_not_run_again_after_a_restart(world: PipelineWorld) -> None:
    await world.first()
    with_hooks(world, '[hooks]\npre_deploy = "python3 manage.py migrate"\n')
    crashed = asyncio.Event()
    save = world.astore.save_deployment

    async def die_after_the_hook(doc: dict[str, Any], *, active: bool) -> None:
        await save(doc, active=active)
        progress = doc.get("progress") or {}
        if progress.get("phase") == "steps" and progress.get("step") == 1 and not crashed.is_set():
            crashed.set()  # the hook's step is done and persisted; the next one not begun
            raise asyncio.CancelledError

    world.astore.save_deployment = die_after_the_hook  # type: ignore[method-assign]
    submitted = await world.submit("bbbb2222", STRATEGIES["blue-green"])
    await crashed.wait()
    await world.pipeline.stop()
    del world.astore.save_deployment
    world.pipeline = world.new_pipeline()
    await world.pipeline.start()
    doc = await world.wait(submitted["id"])
    assert doc["status"] == "Success", doc.get("error")
    assert [c.hook.point for c in world.runtime.hooks] == ["pre_deploy"]


@pytest.mark.parametrize("outcome", ["succeeded", "failed"])
async def test_a_hook_recorded_just_before_a_crash_is_not_run_again(
    world: PipelineWorld, outcome: str
) -> None:
    """Killed between the hook's stage and the next step index: the recorded outcome stands."""
    stable = await world.first()
    with_hooks(world, '[hooks]\npre_deploy = "python3 manage.py migrate"\n')
    if outcome == "failed":
        world.runtime.hook_exit["pre_deploy"] = 1
    crashed = asyncio.Event()
    save = world.astore.save_deployment

    async def die_after_the_stage(doc: dict[str, Any], *, active: bool) -> None:
        await save(doc, active=active)
        last = (doc.get("stages") or [{}])[-1]
        ours = last.get("name") == "hook_pre_deploy" and last.get("status") == outcome
        if ours and not crashed.is_set():
            crashed.set()
            raise asyncio.CancelledError

    world.astore.save_deployment = die_after_the_stage  # type: ignore[method-assign]
    submitted = await world.submit("bbbb2222", STRATEGIES["blue-green"])
    await crashed.wait()
    await world.pipeline.stop()
    del world.astore.save_deployment
    world.pipeline = world.new_pipeline()
    await world.pipeline.start()
    doc = await world.wait(submitted["id"])
    assert len(world.runtime.hooks) == 1
    if outcome == "succeeded":
        assert doc["status"] == "Success", doc.get("error")
    else:
        assert doc["status"] == "Failed"
        assert doc["error"]["code"] == "hook_failed"
        assert world.weights() == {stable: 100}


async def test_a_fleet_runs_its_hook_in_the_first_region_only(tmp_path: Path) -> None:
    builder = FakeBuilder(manifest=parse_manifest(manifest(HOOKS)))
    w = PipelineWorld(tmp_path, builder=builder, regions=("eu", "us"))
    await w.pipeline.start()
    try:
        doc = await w.wait(
            (await w.submit("aaaa1111", STRATEGIES["blue-green"], regions=["eu", "us"]))["id"]
        )
        assert doc["status"] == "Success", doc.get("error")
        assert [c.hook.point for c in w.fakes["eu"].hooks] == ["pre_deploy", "pre_switch",
                                                              "post_switch"]  # fmt: skip
        assert w.fakes["us"].hooks == []
    finally:
        await w.pipeline.stop()
