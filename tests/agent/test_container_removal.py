"""ContainerLauncher._remove retries what the engine failed to remove.

An engine that fails to delete a container's filesystem (vfs on a busy disk answers 500 "device
or resource busy") leaves the container Dead, and only another removal takes it away; no engine
fails on demand, so the docker client's low-level API is replaced by a recorder here.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import docker
import pytest
import requests

from shipyard.agent import containers
from shipyard.agent.containers import ContainerLauncher


def _error(status: int, message: str) -> docker.errors.APIError:
    response = requests.Response()
    response.status_code = status
    return docker.errors.APIError(message, response=response, explanation=message)


class Engine:
    """``remove_container`` answers with ``outcomes`` in turn (an exception to raise, or None)."""

    def __init__(self, *outcomes: Exception | None) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def remove_container(self, container_id: str, **options: Any) -> None:
        self.calls.append((container_id, options))
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome


def _launcher(engine: Engine) -> ContainerLauncher:
    client = cast(docker.DockerClient, SimpleNamespace(api=engine))
    return ContainerLauncher(client, client, agent_id="/agents/a", region="local")


@pytest.fixture(autouse=True)
def _no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(containers, "REMOVE_BACKOFF", (0.0, 0.0, 0.0))


async def test_a_removal_the_engine_failed_is_tried_again_until_it_succeeds() -> None:
    busy = _error(500, "driver vfs failed to remove root filesystem: device or resource busy")
    engine = Engine(busy, busy, None)
    await _launcher(engine).remove("c1")
    assert engine.calls == [("c1", {"force": True, "v": True})] * 3


async def test_a_removal_already_under_way_or_a_gone_container_is_not_retried() -> None:
    engine = Engine(_error(409, "removal of container c1 is already in progress"))
    await _launcher(engine).remove("c1")
    gone = Engine(docker.errors.NotFound("no such container"))
    await _launcher(gone).remove("c1")
    assert len(engine.calls) == len(gone.calls) == 1


async def test_removal_gives_up_after_its_attempts_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    busy = _error(500, "device or resource busy")
    engine = Engine(*[busy] * 4)
    await _launcher(engine).remove("c1")
    assert len(engine.calls) == 4  # three backoffs, four attempts
    assert "cannot remove container c1" in caplog.text
    assert "device or resource busy" in caplog.text
