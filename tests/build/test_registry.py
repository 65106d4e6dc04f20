"""registry.py: the manifest's [build] builder picks a registered kind and its config model."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from shipyard.build import registry
from shipyard.build.base import Builder, BuildRequest
from shipyard.build.cloudbuild import CloudBuildBuilder
from shipyard.build.docker import DockerBuilder
from shipyard.build.fake import FakeBuilder
from shipyard.build.local import LocalBuilder
from shipyard.domain.manifest import Manifest, parse_manifest
from shipyard.domain.models import SourceConfig
from shipyard.errors import BuildFailed, ManifestError

from .helpers import GitRepo, manifest

SOURCE = SourceConfig(repository="/srv/app", branch="main", commit="abcd")
CLOUD = {"project_id": "p", "registry": "gcr.io/p", "cache_bucket": "p-cache"}


def _manifest(builder: str) -> Manifest:
    return parse_manifest(manifest(f'builder = "{builder}"'))


@pytest.mark.parametrize(
    ("kind", "settings", "expected"),
    [
        pytest.param("local", {}, LocalBuilder, id="local"),
        pytest.param("docker", {"base_url": "unix:///x.sock"}, DockerBuilder, id="docker"),
        pytest.param("cloudbuild", CLOUD, CloudBuildBuilder, id="cloudbuild"),
    ],
)
def test_each_kind_gets_its_builder_and_config(
    kind: str, settings: dict[str, str], expected: type, tmp_path: Path
) -> None:
    config = registry.BuildConfig(data_dir=tmp_path, builders={kind: settings})
    builder = registry.builder_for(_manifest(kind), SOURCE, config)
    assert isinstance(builder, expected)
    assert builder.kind == kind
    assert getattr(builder, "config").kind == kind  # noqa: B009 - not on the protocol


def test_cloudbuild_without_settings_is_a_clear_failure(tmp_path: Path) -> None:
    config = registry.BuildConfig(data_dir=tmp_path)
    with pytest.raises(BuildFailed, match=r"'cloudbuild' builder is not configured.*project_id"):
        registry.builder_for(_manifest("cloudbuild"), SOURCE, config)


def test_settings_are_validated_by_the_kind_model(tmp_path: Path) -> None:
    config = registry.BuildConfig(data_dir=tmp_path, builders={"local": {"no_such": 1}})
    with pytest.raises(BuildFailed, match="no_such"):
        registry.builder_for(_manifest("local"), SOURCE, config)


def test_unregistered_kind_is_a_manifest_error(tmp_path: Path) -> None:
    base = _manifest("local")
    odd = base.model_copy(update={"build": base.build.model_copy(update={"builder": "nix"})})
    with pytest.raises(ManifestError, match="'nix' is not available"):
        registry.builder_for(odd, SOURCE, registry.BuildConfig(data_dir=tmp_path))


class _FakeSettings(BaseModel):
    kind: str = "local"


async def test_a_kind_can_be_replaced_and_build_source_uses_the_manifest(
    repo: GitRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeBuilder(kind="local")

    def factory(data_dir: Path, settings: object, shared_dir: Path | None) -> Builder:
        return fake

    monkeypatch.setitem(registry._REGISTRY, "local", registry._REGISTRY["local"])
    registry.register("local", _FakeSettings, factory)
    artifact = await registry.build_source(
        BuildRequest(repo.source()), registry.BuildConfig(data_dir=tmp_path)
    )
    assert fake.requests[0].source.commit == repo.head()
    assert artifact.builder == "local"


@pytest.mark.parametrize("kind", ["local", "docker", "cloudbuild"])
def test_every_builder_the_manifest_accepts_is_registered(kind: str) -> None:
    assert _manifest(kind).build.builder in registry.kinds()


def test_the_manifest_rejects_other_builders() -> None:
    with pytest.raises(ManifestError, match=r"build\.builder"):
        _manifest("kaniko")


async def test_fake_builder_keeps_the_contract() -> None:
    fake = FakeBuilder()
    a = await fake.build(BuildRequest(SOURCE))
    b = await fake.build(BuildRequest(SOURCE))
    assert a.digest == b.digest and a.digest.startswith("sha256:")
    assert b.cache.artifact_hit and not a.cache.artifact_hit
    fresh = await fake.build(BuildRequest(SOURCE, no_cache=True))
    assert not fresh.cache.artifact_hit and fresh.cache.no_cache and fresh.digest == a.digest
    fake.fail_with = BuildFailed("exit 1")
    with pytest.raises(BuildFailed):
        await fake.build(BuildRequest(SOURCE))
    assert len(fake.requests) == 4 and fake.requests[2].no_cache
