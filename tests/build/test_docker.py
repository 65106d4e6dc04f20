"""DockerBuilder against a real Docker Engine (started by the session, see conftest).

Nothing can be pulled here, so images are ``FROM scratch`` with a statically linked busybox
copied in from the build context.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from shipyard.build.base import BuildRequest
from shipyard.build.docker import INPUTS_LABEL, DockerBuilder, DockerBuilderConfig
from shipyard.errors import BuildFailed, SourceError

from .helpers import GitRepo, manifest

pytestmark = pytest.mark.docker

BUSYBOX = Path("/bin/busybox")
DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
COPY app.py /app/app.py
RUN ["/bin/busybox", "echo", "hello from RUN"]
"""


@pytest.fixture
def engine(docker_engine: str) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=docker_engine)
    yield client
    client.close()


@pytest.fixture
def image_repo(repo: GitRepo) -> GitRepo:
    if not BUSYBOX.is_file():
        pytest.fail("the docker tests need a static /bin/busybox (Debian: busybox-static)")
    repo.copy_in(BUSYBOX, "busybox")
    repo.write("Dockerfile", DOCKERFILE)
    repo.commit("image")
    return repo


def _builder(docker_engine: str, data_dir: Path) -> DockerBuilder:
    return DockerBuilder(data_dir, DockerBuilderConfig(base_url=docker_engine))


async def test_builds_an_image_from_the_commit(
    image_repo: GitRepo, data_dir: Path, docker_engine: str, engine: docker.DockerClient
) -> None:
    lines: list[str] = []
    artifact = await _builder(docker_engine, data_dir).build(
        BuildRequest(image_repo.source(), log_sink=lines.append)
    )
    image = engine.images.get(artifact.digest)
    assert image.id == artifact.digest
    assert artifact.digest.startswith("sha256:") and len(artifact.digest) == 71
    assert artifact.kind == "oci-image"
    assert artifact.location == f"shipyard/hello:{image_repo.head()[:12]}"
    assert artifact.location in image.tags
    assert INPUTS_LABEL in image.labels
    assert "hello from RUN" in lines  # streamed line by line
    assert any(line.startswith("Step 1/") and "FROM scratch" in line for line in lines)
    assert artifact.log_path is not None and "hello from RUN" in artifact.log_path.read_text()
    assert artifact.cache.artifact_hit is False
    assert artifact.cache.layers_built is not None and artifact.cache.layers_built >= 1


async def test_no_op_rebuild_is_answered_from_the_engine(
    image_repo: GitRepo, data_dir: Path, docker_engine: str
) -> None:
    builder = _builder(docker_engine, data_dir)
    first = await builder.build(BuildRequest(image_repo.source()))
    lines: list[str] = []
    again = await builder.build(BuildRequest(image_repo.source(), log_sink=lines.append))
    assert again.digest == first.digest
    assert again.cache.artifact_hit is True
    assert not any(line.startswith("Step ") for line in lines)  # nothing sent to the engine


async def test_no_cache_builds_every_step_again(
    image_repo: GitRepo, data_dir: Path, docker_engine: str
) -> None:
    builder = _builder(docker_engine, data_dir)
    first = await builder.build(BuildRequest(image_repo.source()))
    lines: list[str] = []
    fresh = await builder.build(
        BuildRequest(image_repo.source(), log_sink=lines.append, no_cache=True)
    )
    assert fresh.cache.artifact_hit is False and fresh.cache.no_cache is True
    assert fresh.cache.layers_cached == 0  # the engine was asked for nocache
    assert fresh.cache.layers_built is not None and fresh.cache.layers_built >= 3
    assert "hello from RUN" in lines and "---> Using cache" not in [s.strip() for s in lines]
    assert fresh.digest != first.digest  # a new RUN layer: a new image
    # Both images carry the input key; a later build reuses the newest, the one just built.
    again = await builder.build(BuildRequest(image_repo.source()))
    assert again.cache.artifact_hit is True and again.digest == fresh.digest


async def test_source_change_reuses_the_layer_cache(
    image_repo: GitRepo, data_dir: Path, docker_engine: str
) -> None:
    builder = _builder(docker_engine, data_dir)
    await builder.build(BuildRequest(image_repo.source()))
    image_repo.write("app.py", "print('v2')\n")
    changed = await builder.build(BuildRequest(image_repo.source(image_repo.commit("v2"))))
    assert changed.cache.artifact_hit is False
    assert changed.cache.layers_cached == 1  # COPY busybox; app.py changed, so the rest reran


async def test_failing_run_step(image_repo: GitRepo, data_dir: Path, docker_engine: str) -> None:
    image_repo.write("Dockerfile", DOCKERFILE + 'RUN ["/bin/busybox", "false"]\n')
    commit = image_repo.commit("failing step")
    with pytest.raises(BuildFailed, match="returned a non-zero code: 1"):
        await _builder(docker_engine, data_dir).build(BuildRequest(image_repo.source(commit)))


async def test_invalid_dockerfile(image_repo: GitRepo, data_dir: Path, docker_engine: str) -> None:
    image_repo.write("Dockerfile", "FROMM scratch\n")
    commit = image_repo.commit("typo")
    with pytest.raises(BuildFailed, match="docker build failed"):
        await _builder(docker_engine, data_dir).build(BuildRequest(image_repo.source(commit)))


async def test_build_timeout(image_repo: GitRepo, data_dir: Path, docker_engine: str) -> None:
    image_repo.write("Dockerfile", DOCKERFILE + 'RUN ["/bin/busybox", "sleep", "60"]\n')
    image_repo.write("shipyard.toml", manifest("timeout_seconds = 3"))
    commit = image_repo.commit("slow")
    with pytest.raises(BuildFailed, match=r"timed out.*timeout of 3 s"):
        await _builder(docker_engine, data_dir).build(BuildRequest(image_repo.source(commit)))


async def test_dockerfile_from_the_request_or_the_manifest(
    image_repo: GitRepo, data_dir: Path, docker_engine: str
) -> None:
    image_repo.write("deploy/Containerfile", DOCKERFILE.replace("hello from RUN", "containerfile"))
    image_repo.write("shipyard.toml", manifest('dockerfile = "deploy/Containerfile"'))
    commit = image_repo.commit("containerfile")
    lines: list[str] = []
    await _builder(docker_engine, data_dir).build(
        BuildRequest(image_repo.source(commit), log_sink=lines.append)
    )
    assert "containerfile" in lines


@pytest.mark.parametrize(
    ("target", "message"),
    [
        pytest.param("../../../../etc/hostname", "points outside", id="relative-escape"),
        pytest.param("/etc/hostname", "points outside", id="absolute"),
        pytest.param("missing/Dockerfile", "not found", id="dangling"),
    ],
)
async def test_dockerfile_symlinks_must_stay_inside(
    target: str, message: str, image_repo: GitRepo, data_dir: Path, docker_engine: str
) -> None:
    image_repo.remove("Dockerfile")
    image_repo.symlink("Dockerfile", target)
    commit = image_repo.commit("symlinked dockerfile")
    with pytest.raises(SourceError, match=message):
        await _builder(docker_engine, data_dir).build(BuildRequest(image_repo.source(commit)))


async def test_symlinked_dockerfile_inside_the_repository_is_fine(
    image_repo: GitRepo, data_dir: Path, docker_engine: str
) -> None:
    image_repo.git("mv", "Dockerfile", "Dockerfile.real")
    image_repo.symlink("Dockerfile", "Dockerfile.real")
    commit = image_repo.commit("link")
    artifact = await _builder(docker_engine, data_dir).build(
        BuildRequest(image_repo.source(commit))
    )
    assert artifact.digest.startswith("sha256:")


async def test_unreachable_engine_is_a_build_failure(
    image_repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    builder = DockerBuilder(
        data_dir, DockerBuilderConfig(base_url=f"unix://{tmp_path}/no-such.sock")
    )
    with pytest.raises(BuildFailed, match="Docker Engine"):
        await builder.build(BuildRequest(image_repo.source()))
