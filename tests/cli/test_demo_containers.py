"""The container demo's image (``shipyard demo --containers``) against the session's Docker
Engine: the bundled ``hello-container`` example builds with the Docker builder and, run the way
the agent runs containers (host network, ``PORT``, as nobody with every capability dropped),
answers like the hello example, broken releases included. Also: ``ensure_engine`` uses an
engine that answers rather than starting another.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import httpx
import pytest

from shipyard.build.base import BuildRequest
from shipyard.build.docker import DockerBuilder, DockerBuilderConfig
from shipyard.cli.demo import _git, commit_version
from shipyard.cli.demo_containers import container_lines, make_container_repo, remove_containers
from shipyard.domain.models import SourceConfig
from shipyard.runtime.docker_engine import ensure_engine

pytestmark = [pytest.mark.docker, pytest.mark.e2e]


@pytest.fixture
def engine(docker_engine: str) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=docker_engine)
    yield client
    client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _build(repo: Path, commit: str, data_dir: Path, docker_engine: str) -> str:
    builder = DockerBuilder(data_dir, DockerBuilderConfig(base_url=docker_engine))
    source = SourceConfig(repository=str(repo), branch="main", commit=commit)
    artifact = await builder.build(BuildRequest(source))
    assert artifact.kind == "oci-image"
    return artifact.digest


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def _wait_for(url: str, status: int, within: float = 30) -> None:
    """Poll ``url`` until it answers ``status`` (bounded; the container starts on its own)."""
    deadline = time.monotonic() + within
    while (got := _status(url)) != status:
        assert time.monotonic() < deadline, f"{url} answered {got}, not {status}, for {within} s"
        time.sleep(0.05)


def _run(engine: docker.DockerClient, image: str, port: int) -> str:
    container = engine.containers.run(
        image,
        detach=True,
        network_mode="host",
        environment={"PORT": str(port)},
        user="65534:65534",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        labels={"dev.shipyard.service": "hello", "dev.shipyard.revision": "test"},
    )
    return str(container.id)


async def test_image_builds_and_answers_like_the_hello_example(
    tmp_path: Path, docker_engine: str, engine: docker.DockerClient
) -> None:
    repo = make_container_repo(tmp_path / "repo")
    image = await _build(repo, _git(repo, "rev-parse", "HEAD"), tmp_path / "data", docker_engine)
    port = _free_port()
    container = _run(engine, image, port)
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", 200)
        answer = httpx.get(f"http://127.0.0.1:{port}/")
        assert (answer.status_code, answer.text) == (200, "hello from v1\n")
        lines = container_lines(docker_engine, "hello")
        assert any(line.startswith(container[:12]) and "revision=test" in line for line in lines)
        engine.containers.get(container).stop(timeout=10)
        # start.sh forwards docker stop's TERM to httpd: the container ends at once, not killed.
        assert engine.containers.get(container).attrs["State"]["ExitCode"] == 0
    finally:
        engine.containers.get(container).remove(force=True)

    # From an engine it did not start, the demo removes its own agents' containers, no others.
    ours, theirs = tmp_path / "demo" / "data", tmp_path / "other"
    mine, other = (
        str(engine.containers.create(image, labels={"dev.shipyard.agent": str(d)}).id)
        for d in (ours / "agents" / "local", theirs / "agents" / "local")
    )
    try:
        assert remove_containers(docker_engine, ours) == 1
        left = {str(c.id) for c in engine.containers.list(all=True, sparse=True)}  # shared engine
        assert mine not in left and other in left
    finally:
        for cid in (mine, other):
            with contextlib.suppress(docker.errors.NotFound):
                engine.containers.get(cid).remove(force=True)


async def test_broken_releases_fail_their_health_check_or_their_requests(
    tmp_path: Path, docker_engine: str, engine: docker.DockerClient
) -> None:
    repo = make_container_repo(tmp_path / "repo")
    data = tmp_path / "data"
    sick = await _build(repo, commit_version(repo, "v2", unhealthy_after=3), data, docker_engine)
    failing = await _build(repo, commit_version(repo, "v3", error_rate=1.0), data, docker_engine)
    sick_port, failing_port = _free_port(), _free_port()
    started = [_run(engine, sick, sick_port)]
    try:
        _wait_for(f"http://127.0.0.1:{sick_port}/health", 200)
        assert httpx.get(f"http://127.0.0.1:{sick_port}/").text == "hello from v2\n"
        _wait_for(f"http://127.0.0.1:{sick_port}/health", 404)

        started.append(_run(engine, failing, failing_port))
        _wait_for(f"http://127.0.0.1:{failing_port}/health", 200)
        answer = httpx.get(f"http://127.0.0.1:{failing_port}/")
        assert (answer.status_code, answer.text) == (500, "v3 failed\n")
    finally:
        for container in started:
            engine.containers.get(container).remove(force=True)


def test_ensure_engine_uses_the_engine_that_answers(
    docker_engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", docker_engine)
    with ensure_engine() as (address, started):
        assert (address, started) == (docker_engine, False)
