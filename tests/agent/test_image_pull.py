"""``agent.images.ensure_image`` against a real registry and a second engine (another host): an
image the engine lacks is pulled by its reference by digest, and whatever a reference resolves
to must be the image id that was built, scanned and signed, or the replica is not started.

The images here are pushed the way the docker builder pushes them (tests/build/
test_docker_push.py covers the builder): tagged into the registry's namespace, pushed, and named
``<registry>/<repo>@<manifest digest>``, with the image id as the artifact digest.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from shipyard.agent import images
from shipyard.errors import ArtifactVerificationFailed, ShipyardError
from tests.oci_registry import Registry, build_scratch_image, push, running_registry

pytestmark = pytest.mark.docker


@pytest.fixture
def builder_engine(docker_engine: str) -> Iterator[docker.DockerClient]:
    """The engine that builds and pushes."""
    client = docker.DockerClient(base_url=docker_engine)
    yield client
    client.close()


@pytest.fixture
def other_engine(other_docker_engine: str) -> Iterator[docker.DockerClient]:
    """Another host's engine: it has only what it pulled."""
    client = docker.DockerClient(base_url=other_docker_engine)
    yield client
    client.close()


async def _ensure(client: docker.DockerClient, location: str, digest: str) -> str:
    # The contract names the arguments; whether the agent calls it in a worker thread (plain
    # function) or awaits it is the runtime's choice, so both are accepted here.
    result = images.ensure_image(client, location, digest, where="test replica")
    if inspect.isawaitable(result):
        result = await result
    return str(result)


def _published(
    client: docker.DockerClient, registry: Registry, marker: str, repo: str = "shipyard/app"
) -> tuple[str, str]:
    """An image built and pushed as the builder does: (location by digest, image id)."""
    image_id = build_scratch_image(client, marker)
    repository = f"{registry.address}/{repo}"
    manifest_digest = push(client, image_id, repository, "v1")
    return f"{repository}@{manifest_digest}", image_id


async def test_an_image_the_engine_lacks_is_pulled_by_digest(
    builder_engine: docker.DockerClient,
    other_engine: docker.DockerClient,
    oci_registry: Registry,
    request: pytest.FixtureRequest,
) -> None:
    location, image_id = _published(builder_engine, oci_registry, request.node.nodeid)
    with pytest.raises(docker.errors.ImageNotFound):
        other_engine.images.get(image_id)
    assert await _ensure(other_engine, location, image_id) == image_id
    assert other_engine.images.get(image_id).id == image_id


async def test_an_image_the_engine_has_needs_no_registry(
    builder_engine: docker.DockerClient, request: pytest.FixtureRequest
) -> None:
    image_id = build_scratch_image(builder_engine, request.node.nodeid)
    # Nothing listens on port 9: a pull would fail, so success means none was attempted.
    location = f"127.0.0.1:9/shipyard/app@sha256:{'0' * 64}"
    assert await _ensure(builder_engine, location, image_id) == image_id


async def test_a_reference_that_resolves_to_another_image_is_refused_naming_both(
    builder_engine: docker.DockerClient,
    other_engine: docker.DockerClient,
    oci_registry: Registry,
    request: pytest.FixtureRequest,
) -> None:
    repository = f"{oci_registry.address}/shipyard/retagged"
    built = build_scratch_image(builder_engine, f"{request.node.nodeid} built")
    push(builder_engine, built, repository, "v1")
    # Someone with push rights re-points the tag at another image.
    impostor = build_scratch_image(builder_engine, f"{request.node.nodeid} impostor")
    push(builder_engine, impostor, repository, "v1")
    with pytest.raises(ArtifactVerificationFailed) as caught:
        await _ensure(other_engine, f"{repository}:v1", built)
    assert built in caught.value.message and impostor in caught.value.message


async def test_a_manifest_rewritten_in_the_registry_is_not_run(
    builder_engine: docker.DockerClient,
    other_engine: docker.DockerClient,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    with running_registry(tmp_path) as registry:
        location, image_id = _published(builder_engine, registry, f"{request.node.nodeid} good")
        _, evil_id = evil = _published(
            builder_engine, registry, f"{request.node.nodeid} evil", repo="shipyard/evil"
        )
        # The bytes stored under the good manifest's digest become the impostor's manifest.
        blobs = registry.storage / "docker/registry/v2/blobs/sha256"
        good = location.partition("@sha256:")[2]
        bad = evil[0].partition("@sha256:")[2]
        (blobs / good[:2] / good / "data").write_bytes(
            (blobs / bad[:2] / bad / "data").read_bytes()
        )
        with pytest.raises(ShipyardError):  # translated: no docker.errors.* escapes
            await _ensure(other_engine, location, image_id)
        for absent in (image_id, evil_id):
            with pytest.raises(docker.errors.ImageNotFound):
                other_engine.images.get(absent)
