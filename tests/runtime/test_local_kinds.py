"""What the local runtime says it can run follows its agent's Docker Engine: an agent whose
engine does not answer runs directories only, and a deployment of an image then fails in
preflight (before scanning) saying where the engine was looked for."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.build.base import Artifact
from shipyard.runtime.local import LocalRuntime
from tests.orchestrator.world import PipelineWorld


async def test_an_agent_without_an_engine_runs_directories_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = f"unix://{tmp_path}/no-docker.sock"
    monkeypatch.setenv("DOCKER_HOST", missing)  # what the agent LocalRuntime starts reads
    rt = await LocalRuntime.connect(tmp_path / "data", "local")
    try:
        assert rt.artifact_kinds == ("directory",)
        problem = rt.artifact_kind_problems["oci-image"]
        assert f"the Docker Engine is unreachable at {missing}" in problem
        assert await rt.list_services() == []  # asks again, still none
        assert rt.artifact_kinds == ("directory",)
    finally:
        await rt.aclose()
        info = tmp_path / "data" / "agents" / "local" / "agent.json"
        if info.exists():
            os.kill(int(json.loads(info.read_text())["pid"]), signal.SIGTERM)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PipelineWorld]:
    w = PipelineWorld(tmp_path, replicas=1)
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()


async def test_an_image_deployment_fails_in_preflight_naming_the_engine(
    world: PipelineWorld,
) -> None:
    reason = "the Docker Engine is unreachable at unix:///nowhere/docker.sock"
    world.runtime.artifact_kind_problems = {"oci-image": reason}  # type: ignore[attr-defined]
    real_build = world.builder.build

    async def image_build(request: Any) -> Artifact:
        artifact = await real_build(request)
        return dataclasses.replace(artifact, kind="oci-image", builder="docker")

    world.builder.build = image_build  # type: ignore[method-assign]
    doc = await world.deploy("aaaa1111")
    assert doc["status"] == "Failed"
    assert reason in doc["error"]["message"]
    assert world.runtime.started == []
