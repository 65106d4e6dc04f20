"""Pre-flight: the plan is computed purely from the request, the manifest and what was observed,
and applied only once it is valid (a refused plan writes nothing)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from shipyard.build.fake import DEFAULT_MANIFEST, FakeBuilder
from shipyard.domain.manifest import parse_manifest
from shipyard.domain.models import DeploymentRequest
from shipyard.errors import InvalidInput
from shipyard.orchestrator.preflight import Situation, calculate_plan
from shipyard.runtime.base import ContainerSpec
from shipyard.store.db import revisions
from shipyard.strategies.steps import RollingLimits, ScaleCandidate, SetWeight
from tests.orchestrator.world import PipelineWorld, progressive

STICKY = parse_manifest(progressive(replicas=3))
PLAIN = parse_manifest(DEFAULT_MANIFEST)
STABLE = Situation(stable="v1", stable_ready=2, stable_desired=4)


def request(strategy: dict[str, Any]) -> DeploymentRequest:
    return DeploymentRequest.model_validate(
        {
            "source": {"repository": "/repo", "branch": "main", "commit": "abcd"},
            "target": {"service_name": "api"},
            "strategy": strategy,
        }
    )


BLUE_GREEN = {"BlueGreen": {"switch_delay_seconds": 5}}
CANARY = {"Canary": {"stages": [{"weight": 10, "duration_seconds": 60, "sticky": True}]}}
ROLLING = {"Rolling": {"max_surge": 1, "max_unavailable": 0}}


@pytest.mark.parametrize(
    ("strategy", "situation", "announce", "rolling"),
    [
        (BLUE_GREEN, STABLE, False, None),
        (BLUE_GREEN, Situation(), False, None),
        (CANARY, STABLE, True, None),
        (ROLLING, STABLE, True, RollingLimits(3, 4, 1, 0)),
        (ROLLING, Situation(), True, RollingLimits(3, 0, 1, 0)),
    ],
    ids=["blue-green", "first-blue-green", "canary", "rolling", "first-rolling"],
)
def test_the_plan_carries_what_the_strategy_knows(
    strategy: dict[str, Any],
    situation: Situation,
    announce: bool,
    rolling: RollingLimits | None,
) -> None:
    plan = calculate_plan(request(strategy), STICKY, situation)
    assert plan.announce is announce
    assert plan.rolling == rolling
    assert plan.steps


def test_a_rolling_update_starts_from_stables_ready_replicas() -> None:
    plan = calculate_plan(request(ROLLING), STICKY, STABLE)
    # 3 desired, 2 stable ready now, surge 1: the first batch brings the candidate to 2.
    assert plan.steps[0] == ScaleCandidate(2, name="scale_up_2")


@pytest.mark.parametrize(
    ("strategy", "manifest", "message"),
    [
        (CANARY, PLAIN, "names no key"),
        ({"Rolling": {"max_surge": 0, "max_unavailable": "20%"}}, STICKY, "both resolve to 0"),
    ],
    ids=["sticky-without-key", "rolling-limits-zero"],
)
def test_a_plan_that_cannot_run_is_refused(
    strategy: dict[str, Any], manifest: Any, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        calculate_plan(request(strategy), manifest, STABLE)


def test_a_first_deploy_plan_skips_to_full_weight() -> None:
    plan = calculate_plan(request(CANARY), STICKY, Situation())
    assert plan.steps[-1] == SetWeight(100)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PipelineWorld]:
    w = PipelineWorld(tmp_path)
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()


async def test_a_refused_plan_writes_no_revision_and_no_plan(world: PipelineWorld) -> None:
    first = await world.deploy("aaaa1111", bake_seconds=0)
    doc = await world.deploy("bbbb2222", {"Canary": {"stages": [{"weight": 10, "sticky": True}]}})
    assert doc["status"] == "Failed" and "names no key" in doc["error"]["message"]
    assert doc["progress"]["plan"] is None and doc["green_revision"] is None
    with world.store.engine.connect() as conn:
        stored = {r[0] for r in conn.execute(select(revisions.c.id))}
    assert stored == {first["green_revision"]}


IMAGE_MANIFEST = """\
[service]
name = "api"
[build]
builder = "docker"
[run]
replicas = 2
port = 8000
memory = "256m"
cpus = 0.5
stop_timeout_seconds = 3
env = { GREETING = "hi" }
"""


async def test_an_image_revision_reaches_the_runtime_with_its_container_settings(
    tmp_path: Path,
) -> None:
    """From the manifest to the spec the data plane runs (read back from the stored revision,
    as rollbacks and restores do): the image digest and reference, no command (the image's
    own), the port inside, the limits and the stop timeout."""
    builder = FakeBuilder(manifest=parse_manifest(IMAGE_MANIFEST), artifact_kind="oci-image")
    w = PipelineWorld(tmp_path, builder=builder)
    d = await w.deploy("cafe1234", {"BlueGreen": {"switch_delay_seconds": 0}})
    assert d["status"] == "Success", d.get("error")
    spec = w.runtime.specs[d["green_revision"]]
    assert spec.artifact_kind == "oci-image"
    assert spec.artifact_location == "shipyard/api:" + ("cafe1234" * 2)[:12]
    assert spec.artifact_digest == d["artifact_digest"]
    assert list(spec.argv) == []
    assert spec.container == ContainerSpec(
        port=8000, memory_bytes=256 * 2**20, nano_cpus=500_000_000
    )
    assert spec.stop_timeout == 3
    assert (spec.replicas, dict(spec.env)) == (2, {"GREETING": "hi"})


async def test_a_directory_revision_has_no_container_settings(tmp_path: Path) -> None:
    w = PipelineWorld(tmp_path)
    d = await w.deploy("cafe1234", {"BlueGreen": {"switch_delay_seconds": 0}})
    assert d["status"] == "Success", d.get("error")
    spec = w.runtime.specs[d["green_revision"]]
    assert (spec.artifact_kind, spec.container, spec.stop_timeout) == ("directory", None, 10.0)
    assert list(spec.argv)
