"""DockerBuilder with a registry: the image is pushed to a real OCI registry (the CNCF
Distribution server, ``tests/oci_registry.py``) and the artifact names it by manifest digest; a
second, independent engine (another host) pulls that reference and gets the very image that was
built, while a tag re-pointed at an impostor cannot redirect it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from shipyard.build.base import Artifact, BuildRequest
from shipyard.build.docker import DockerBuilder, DockerBuilderConfig
from shipyard.errors import BuildFailed
from tests.oci_registry import (
    PullFailed,
    Registry,
    build_scratch_image,
    pull,
    push,
    running_registry,
)

from .helpers import GitRepo, manifest

pytestmark = pytest.mark.docker

BUSYBOX = Path("/bin/busybox")
DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
COPY app.py /app/app.py
"""


@pytest.fixture
def engine(docker_engine: str) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=docker_engine)
    yield client
    client.close()


@pytest.fixture
def other_engine(other_docker_engine: str) -> Iterator[docker.DockerClient]:
    """Another host's engine: it has only what it pulled."""
    client = docker.DockerClient(base_url=other_docker_engine)
    yield client
    client.close()


@pytest.fixture
def image_repo(repo: GitRepo, request: pytest.FixtureRequest) -> GitRepo:
    if not BUSYBOX.is_file():
        pytest.fail("the docker tests need a static /bin/busybox (Debian: busybox-static)")
    repo.copy_in(BUSYBOX, "busybox")
    repo.write("Dockerfile", DOCKERFILE)
    # Content of this test's own: no other test's build (same session engine) is the same image.
    repo.write("app.py", f"print({request.node.name!r})\n")
    repo.commit("image")
    return repo


def _builder(docker_engine: str, data_dir: Path, registry: str | None) -> DockerBuilder:
    return DockerBuilder(data_dir, DockerBuilderConfig(base_url=docker_engine, registry=registry))


def _manifest_at(registry: Registry, artifact: Artifact) -> dict[str, object]:
    """The manifest the registry serves for the artifact's reference by digest, checked to be
    the one that digest names."""
    name, _, digest = artifact.location.removeprefix(registry.address + "/").partition("@")
    status, headers, body = registry.get(f"/v2/{name}/manifests/{digest}")
    assert status == 200, body
    assert headers["docker-content-digest"] == digest
    document: dict[str, object] = json.loads(body)
    return document


def test_the_engines_take_loopback_registries_over_plain_http(
    engine: docker.DockerClient, other_engine: docker.DockerClient
) -> None:
    """What these tests rely on, with no daemon flag: a registry on 127.0.0.0/8 is "insecure"
    (HTTP allowed), as Docker Engine's default configuration says."""
    for client in (engine, other_engine):
        assert "127.0.0.0/8" in client.info()["RegistryConfig"]["InsecureRegistryCIDRs"]


async def test_pushes_by_digest_and_another_engine_pulls_the_same_image(
    image_repo: GitRepo,
    data_dir: Path,
    docker_engine: str,
    oci_registry: Registry,
    other_engine: docker.DockerClient,
) -> None:
    lines: list[str] = []
    artifact = await _builder(docker_engine, data_dir, oci_registry.address).build(
        BuildRequest(image_repo.source(), log_sink=lines.append)
    )
    repository = f"{oci_registry.address}/shipyard/hello"
    assert artifact.location.startswith(f"{repository}@sha256:")
    assert len(artifact.location.partition("@")[2]) == len("sha256:") + 64
    assert artifact.digest.startswith("sha256:")  # still the image id, not the manifest digest
    assert artifact.cache.durations_ms["push"] >= 0
    # The push is in the build log, layer by layer.
    assert any(line.endswith(": Pushed") for line in lines), lines
    assert any(line.startswith(f"[shipyard] pushed as {artifact.location}") for line in lines), (
        lines
    )

    # The registry holds the manifest under that digest, and the tag for the commit; the
    # manifest's config is the image configuration whose digest is the image id.
    document = _manifest_at(oci_registry, artifact)
    config = document["config"]
    assert isinstance(config, dict) and config["digest"] == artifact.digest
    status, _, body = oci_registry.get("/v2/shipyard/hello/tags/list", accept="application/json")
    assert status == 200 and image_repo.head()[:12] in json.loads(body)["tags"]

    # Another host: it does not have the image, pulls the reference, gets the same image id.
    with pytest.raises(docker.errors.ImageNotFound):
        other_engine.images.get(artifact.digest)
    assert pull(other_engine, artifact.location) == artifact.digest


async def test_a_cache_hit_not_pushed_yet_is_pushed(
    image_repo: GitRepo, data_dir: Path, docker_engine: str, tmp_path: Path
) -> None:
    local = await _builder(docker_engine, data_dir, None).build(BuildRequest(image_repo.source()))
    assert "@" not in local.location  # no registry: a local tag
    # Turning the registry on does not rebuild (where an image goes is not an input of it); a
    # registry that has never seen the image gets it.
    with running_registry(tmp_path) as fresh:
        lines: list[str] = []
        again = await _builder(docker_engine, data_dir, fresh.address).build(
            BuildRequest(image_repo.source(), log_sink=lines.append)
        )
        assert again.cache.artifact_hit is True
        assert again.digest == local.digest
        assert again.location.startswith(f"{fresh.address}/shipyard/hello@sha256:")
        assert any(line.endswith(": Pushed") for line in lines), lines
        config = _manifest_at(fresh, again)["config"]
        assert isinstance(config, dict) and config["digest"] == local.digest


async def test_an_unreachable_registry_fails_the_build_naming_it(
    image_repo: GitRepo, data_dir: Path, docker_engine: str
) -> None:
    nowhere = "127.0.0.1:9"  # discard: nothing listens there
    with pytest.raises(BuildFailed, match=f"registry {nowhere} failed") as caught:
        await _builder(docker_engine, data_dir, nowhere).build(BuildRequest(image_repo.source()))
    assert caught.value.detail["registry"] == nowhere
    assert "log_path" in caught.value.detail


async def test_a_registry_that_never_answers_fails_the_push_at_the_build_timeout(
    image_repo: GitRepo, data_dir: Path, docker_engine: str
) -> None:
    image_repo.write("shipyard.toml", manifest("timeout_seconds = 15"))
    commit = image_repo.commit("a build timeout the push obeys too")
    # Built first without a registry, so the timed build below is a cache hit: only the push
    # can run into the limit.
    await _builder(docker_engine, data_dir, None).build(BuildRequest(image_repo.source(commit)))
    with socket.socket() as black_hole:  # accepts connections (the kernel does), never answers
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(16)
        address = f"127.0.0.1:{black_hole.getsockname()[1]}"
        with pytest.raises(BuildFailed, match=f"registry {address} timed out after 15 s"):
            await _builder(docker_engine, data_dir, address).build(
                BuildRequest(image_repo.source(commit))
            )


async def test_a_tag_repointed_at_an_impostor_does_not_move_the_digest_reference(
    image_repo: GitRepo,
    data_dir: Path,
    docker_engine: str,
    engine: docker.DockerClient,
    oci_registry: Registry,
    other_engine: docker.DockerClient,
) -> None:
    artifact = await _builder(docker_engine, data_dir, oci_registry.address).build(
        BuildRequest(image_repo.source())
    )
    # Someone with push rights re-points the commit's tag at another image.
    repository = f"{oci_registry.address}/shipyard/hello"
    impostor = build_scratch_image(engine, f"impostor of {artifact.digest}")
    push(engine, impostor, repository, image_repo.head()[:12])
    by_tag = pull(other_engine, f"{repository}:{image_repo.head()[:12]}")
    assert by_tag == impostor != artifact.digest  # the tag now lies
    # The artifact's reference is by manifest digest: still the image that was built.
    assert pull(other_engine, artifact.location) == artifact.digest


async def test_a_manifest_rewritten_in_the_registry_is_refused_by_the_pulling_engine(
    image_repo: GitRepo,
    data_dir: Path,
    docker_engine: str,
    engine: docker.DockerClient,
    other_engine: docker.DockerClient,
    tmp_path: Path,
) -> None:
    with running_registry(tmp_path) as registry:
        artifact = await _builder(docker_engine, data_dir, registry.address).build(
            BuildRequest(image_repo.source())
        )
        # Someone with access to the registry's storage replaces the bytes stored under the
        # artifact's manifest digest with another image's manifest.
        impostor = build_scratch_image(engine, f"impostor of {artifact.digest}")
        evil = push(engine, impostor, f"{registry.address}/shipyard/hello", "evil")
        blobs = registry.storage / "docker/registry/v2/blobs/sha256"
        good = artifact.location.partition("@sha256:")[2]
        stored = blobs / good[:2] / good / "data"
        assert stored.is_file()
        stored.write_bytes((blobs / evil[7:9] / evil[7:] / "data").read_bytes())

        # The pulling engine checks the bytes against the digest it asked for.
        good_digest = artifact.location.partition("@")[2]
        with pytest.raises(PullFailed, match=f"verification failed for digest {good_digest}"):
            pull(other_engine, artifact.location)
        for image_id in (artifact.digest, impostor):
            with pytest.raises(docker.errors.ImageNotFound):
                other_engine.images.get(image_id)
