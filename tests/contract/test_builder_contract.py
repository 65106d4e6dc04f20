"""One contract, both ``Builder``s the pipeline's tests rely on: ``build.fake.FakeBuilder`` (with
``root``: it materialises its artifacts) and ``build.local.LocalBuilder`` on a real git
repository.

The ``Artifact`` every caller reads: a ``sha256:<64 hex>`` digest, ``kind`` and a directory
``location`` that verifies against that digest, the full commit built, the parsed manifest; a
second build of the same source is a cache hit with the same digest; ``no_cache`` is never a hit
but yields the same digest; a failing build is ``BuildFailed`` with its exit code and log tail,
and its last line reached the log sink.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from shipyard.build.base import Builder, BuildRequest
from shipyard.build.digest import verify_artifact
from shipyard.build.fake import FakeBuilder
from shipyard.build.local import LocalBuilder
from shipyard.domain.manifest import parse_manifest
from shipyard.domain.models import SourceConfig
from shipyard.errors import BuildFailed
from tests.build.helpers import MANIFEST, GitRepo

FAILURE_LINE = "error: tests failed"
FAILING_MANIFEST = MANIFEST.replace(
    "[run]",
    f"[build]\ncommand = \"sh -c 'echo compiling; echo {FAILURE_LINE}; exit 1'\"\n\n[run]",
)


@dataclass
class Builds:
    builder: Builder
    #: A buildable commit (full id) whose manifest is MANIFEST.
    good: SourceConfig
    #: A commit whose build command prints FAILURE_LINE last and exits 1.
    bad: SourceConfig


@pytest.fixture(params=["fake", "local"])
def builds(request: pytest.FixtureRequest, tmp_path: Path) -> Builds:
    repo = GitRepo(tmp_path / "repo")
    repo.write("shipyard.toml", MANIFEST)
    repo.write("app.py", "print('hello')\n")
    good = repo.source(repo.commit("app"))
    repo.write("shipyard.toml", FAILING_MANIFEST)
    bad = repo.source(repo.commit("a build that fails"))
    if request.param == "local":
        (tmp_path / "data").mkdir()
        return Builds(LocalBuilder(tmp_path / "data"), good, bad)
    fake = FakeBuilder(manifest=parse_manifest(MANIFEST), root=tmp_path / "artifacts")
    fake.fail.add(bad.commit)
    return Builds(fake, good, bad)


async def test_an_artifact_is_content_addressed_and_verifies(builds: Builds) -> None:
    artifact = await builds.builder.build(BuildRequest(builds.good))

    assert re.fullmatch(r"sha256:[0-9a-f]{64}", artifact.digest)
    assert artifact.kind == "directory"
    location = Path(artifact.location)
    assert location.is_dir()
    verify_artifact(location, artifact.digest)  # raises if the tree is not what the digest says
    assert artifact.commit == builds.good.commit and len(artifact.commit) == 40
    assert artifact.manifest == parse_manifest(MANIFEST)
    assert artifact.builder == builds.builder.kind
    assert artifact.duration_ms >= 0
    assert artifact.cache.artifact_hit is False
    assert artifact.cache.no_cache is False


async def test_the_same_source_again_is_a_cache_hit_with_the_same_digest(builds: Builds) -> None:
    first = await builds.builder.build(BuildRequest(builds.good))
    again = await builds.builder.build(BuildRequest(builds.good))

    assert again.cache.artifact_hit is True
    assert (again.digest, again.location, again.commit) == (
        first.digest,
        first.location,
        first.commit,
    )
    verify_artifact(Path(again.location), again.digest)


async def test_no_cache_is_never_a_hit_and_builds_the_same_digest(builds: Builds) -> None:
    first = await builds.builder.build(BuildRequest(builds.good, no_cache=True))
    second = await builds.builder.build(BuildRequest(builds.good, no_cache=True))

    for artifact in (first, second):
        assert (artifact.cache.artifact_hit, artifact.cache.no_cache) == (False, True)
    assert first.digest == second.digest
    # And the result is cached for an ordinary build afterwards.
    assert (await builds.builder.build(BuildRequest(builds.good))).cache.artifact_hit is True


async def test_a_failing_build_raises_build_failed_with_its_log_tail(builds: Builds) -> None:
    lines: list[str] = []
    sink: Callable[[str], None] = lines.append

    with pytest.raises(BuildFailed, match="exited with code 1") as caught:
        await builds.builder.build(BuildRequest(builds.bad, log_sink=sink))

    assert caught.value.detail["exit_code"] == 1
    assert caught.value.detail["log_tail"][-1] == FAILURE_LINE
    assert FAILURE_LINE in caught.value.message
    assert FAILURE_LINE in lines
    # A failure caches nothing: the good commit still builds afresh, then hits.
    assert (await builds.builder.build(BuildRequest(builds.good))).cache.artifact_hit is False
