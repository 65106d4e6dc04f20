"""``Settings.shared_dir`` (``serve --shared-dir``): two replicas with data directories of their
own and one shared directory see one set of keys, one fleet PKI, one fleet.json, and what either
built (artifacts, build logs); without the flag everything stays in the data directory.

Contexts are the real ones (``api.context.build_context``) with no local agent, so nothing but
this process runs; the builds are the real local builder's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shipyard.api.context import AppContext, build_context
from shipyard.api.fleet import listener_urls
from shipyard.build.base import BuildRequest
from shipyard.build.local import LocalBuilder
from shipyard.settings import Settings
from tests.build.helpers import GitRepo, manifest

CLUSTER_WIDE = ("keys", "fleet", "fleet.json")


def _settings(data: Path, shared: Path | None = None) -> Settings:
    extra = {} if shared is None else {"shared_dir": shared}
    return Settings(data_dir=data, regions=(), fleet_listen=("127.0.0.1", 0), **extra)


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[tuple[AppContext, AppContext, Path]]:
    shared = tmp_path / "shared"
    contexts: list[AppContext] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            contexts.append(await build_context(_settings(tmp_path / name, shared)))
        yield contexts[0], contexts[1], shared
    finally:
        for context in contexts:
            await context.aclose()


async def test_two_replicas_share_keys_fleet_ca_and_listener_urls(
    replicas: tuple[AppContext, AppContext, Path],
) -> None:
    a, b, shared = replicas
    # A token signed by one replica verifies on the other: one JWT key.
    minted = a.tokens.authority.mint("ci", ["deployment:read"], 600)
    assert b.tokens.authority.verify(minted.token).subject == "ci"
    # One fleet CA, one artifact-signing key (what joined agents trust).
    ra, rb = a.region_service(), b.region_service()
    assert ra.pki.fingerprint() == rb.pki.fingerprint()
    assert ra.pki.ca_path == rb.pki.ca_path == shared / "fleet" / "ca.crt"
    gate_a, gate_b = a.pipeline.deps.gate, b.pipeline.deps.gate
    assert gate_a is not None and gate_b is not None
    assert await gate_a.public_key_pem() == await gate_b.public_key_pem()
    # Attestations and both kinds of build log go to the shared directory.
    for context in (a, b):
        deps = context.pipeline.deps
        assert deps.attestations_dir == shared / "attestations"
        assert deps.logs_dir == shared / "deployments"
        assert deps.builder_logs_dir == shared / "logs"
    assert (shared / "keys" / "jwt.key").is_file() and (shared / "keys" / "signing.key").is_file()
    # Each listener has its own certificate, in its own data directory; both are announced.
    crt_a, crt_b = ra.pki.listener_paths[0], rb.pki.listener_paths[0]
    assert crt_a.parent == a.settings.data_dir / "fleet" and crt_a.is_file()
    assert crt_b.parent == b.settings.data_dir / "fleet" and crt_b.is_file()
    assert crt_a.read_bytes() != crt_b.read_bytes()
    urls = listener_urls(shared)
    assert len(urls) == 2 and len(set(urls)) == 2
    # Nothing cluster-wide in either data directory.
    for context in (a, b):
        for name in CLUSTER_WIDE:
            found = context.settings.data_dir / name
            assert name == "fleet" or not found.exists(), found
        assert not (context.settings.data_dir / "fleet" / "ca.key").exists()


async def test_without_shared_dir_everything_stays_in_the_data_directory(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    settings = _settings(data)
    assert settings.shared_dir == data
    context = await build_context(settings)
    try:
        pki = context.region_service().pki
        assert pki.ca_path == data / "fleet" / "ca.crt" and pki.ca_path.is_file()
        assert pki.listener_paths[0] == data / "fleet" / "listener.crt"
        assert (data / "keys" / "jwt.key").is_file()
        assert listener_urls(data) and (data / "fleet.json").is_file()
    finally:
        await context.aclose()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def _repo(tmp_path: Path) -> GitRepo:
    repo = GitRepo(tmp_path / "repo")
    repo.write("app.py", "print('hello')\n")
    repo.write("shipyard.toml", manifest("command = \"sh -c 'echo compiling; echo built > o'\""))
    repo.commit("app")
    return repo


async def test_what_one_replica_builds_the_other_finds_in_the_shared_dir(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    repo = _repo(tmp_path)
    one = LocalBuilder(tmp_path / "a", shared_dir=shared)
    artifact = await one.build(BuildRequest(repo.source()))
    path = Path(artifact.location)
    assert path.parent == shared / "artifacts" and (path / "o").read_text() == "built\n"
    assert artifact.log_path is not None and artifact.log_path.parent == shared / "logs"
    assert "compiling" in artifact.log_path.read_text()
    assert not (tmp_path / "a" / "artifacts").exists() and not (tmp_path / "a" / "logs").exists()
    # The other replica builds the same inputs into the same digest: the stored one is kept.
    other = LocalBuilder(tmp_path / "b", shared_dir=shared)
    again = await other.build(BuildRequest(repo.source()))
    assert again.digest == artifact.digest and Path(again.location) == path
    assert len(list((shared / "artifacts").glob("sha256-*.meta.json"))) == 1


async def test_a_shared_artifact_store_on_another_file_system_is_copied_into(
    tmp_path: Path,
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the temporary directory")
    shared = shm / f"shipyard-test-{tmp_path.name}"
    try:
        artifact = await LocalBuilder(tmp_path / "a", shared_dir=shared).build(
            BuildRequest(_repo(tmp_path).source())
        )
        path = Path(artifact.location)
        assert path.parent == shared / "artifacts" and (path / "o").read_text() == "built\n"
        assert not list((shared / "artifacts").glob(".incoming-*"))
        assert not list((tmp_path / "a" / "builds").iterdir())
    finally:
        from shipyard.build.cache import make_removable

        if shared.exists():
            make_removable(shared)
            import shutil

            shutil.rmtree(shared)
