"""``GET /fleet/v1/artifacts/{digest}`` (``api/fleet_artifacts.py``): in process through
``httpx.ASGITransport``, with a stand-in for the fleet's client-certificate check. What it sends
unpacks with tar(1) into a tree of the same digest; only digests of recorded directory revisions
are answered, and only from the builder's store; bad and unknown digests are problems."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from shipyard.api import problems
from shipyard.api.fleet_artifacts import DIGEST_HEADER, artifact_routes, recorded_artifacts
from shipyard.build.base import Artifact
from shipyard.build.cache import make_removable
from shipyard.build.digest import artifact_dirname, digest_tree
from shipyard.orchestrator.record import RevisionRecord
from shipyard.store.db import AsyncStore, Store
from shipyard.store.engine import open_engine
from tests.agent.artifact_server import REGION_HEADER, build_artifact, require_test_region


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    return build_artifact(tmp_path_factory.mktemp("built"))


def _store(tmp: Path) -> AsyncStore:
    return AsyncStore(Store(open_engine(None, tmp)))


async def _record(store: AsyncStore, digest: str, location: str, kind: str = "directory") -> None:
    rev = RevisionRecord.model_validate(
        {
            "service": "svc",
            "revision": f"r-{digest[7:15]}-{kind}",
            "artifact_digest": digest,
            "artifact_location": location,
            "argv": ["python3", "app.py"],
            "artifact_kind": kind,
        }
    )
    await store.save_revision(rev.revision, "svc", "local", "d-1", rev.model_dump(mode="json"), 1.0)


def _client(app: FastAPI, *, region: str | None = "eu") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://cp",
        headers={REGION_HEADER: region} if region else {},
    )


def _app(built: Artifact, tmp: Path) -> tuple[FastAPI, AsyncStore]:
    store = _store(tmp)
    app = FastAPI()
    problems.install(app)
    artifacts = Path(built.location).parent
    app.include_router(artifact_routes(recorded_artifacts(store, artifacts), require_test_region))
    return app, store


@pytest.mark.parametrize("encoding", ["gzip", "identity"])
async def test_a_recorded_artifact_is_sent_as_a_tar_that_tar_unpacks_to_the_digest(
    built: Artifact, tmp_path: Path, encoding: str
) -> None:
    app, store = _app(built, tmp_path)
    await _record(store, built.digest, built.location)
    async with _client(app) as client:
        r = await client.get(
            f"/fleet/v1/artifacts/{built.digest}", headers={"accept-encoding": encoding}
        )
    assert r.status_code == 200
    assert r.headers[DIGEST_HEADER] == built.digest
    assert r.headers["content-type"] == "application/x-tar"
    assert "content-length" not in r.headers  # built on the fly
    raw = r.content  # httpx undoes Content-Encoding; the raw body is what was sent
    assert r.headers.get("content-encoding") == ("gzip" if encoding == "gzip" else None)
    out = tmp_path / "unpacked"
    out.mkdir()
    subprocess.run(["tar", "-x", "-C", str(out)], input=raw, check=True)
    assert digest_tree(out) == built.digest
    if encoding == "gzip":  # and compressed it is smaller than the tar
        async with _client(app) as client:
            wire = await _wire_bytes(client, built.digest)
        assert gzip.decompress(wire) == raw
        assert len(wire) < len(raw)


async def _wire_bytes(client: httpx.AsyncClient, digest: str) -> bytes:
    async with client.stream(
        "GET", f"/fleet/v1/artifacts/{digest}", headers={"accept-encoding": "gzip"}
    ) as r:
        return b"".join([chunk async for chunk in r.aiter_raw()])


async def test_the_same_tree_gives_the_same_bytes(built: Artifact, tmp_path: Path) -> None:
    app, store = _app(built, tmp_path)
    await _record(store, built.digest, built.location)
    async with _client(app) as client:
        first, second = [
            (await client.get(f"/fleet/v1/artifacts/{built.digest}")).content for _ in range(2)
        ]
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        infos = tar.getmembers()
    assert {(m.uid, m.gid, m.mtime, m.uname) for m in infos} == {(0, 0, 0, "")}
    modes = {m.name: m.mode for m in infos if m.isreg()}
    assert modes["bin/tool"] == 0o755 and modes["app.py"] == 0o644


@pytest.mark.parametrize(
    ("digest", "status", "code"),
    [
        ("sha256:" + "a" * 64, 404, "unknown_artifact"),  # never recorded
        ("sha256:" + "A" * 64, 400, "invalid_digest"),
        ("sha256:abc", 400, "invalid_digest"),
        ("md5:" + "a" * 32, 400, "invalid_digest"),
        ("sha256-" + "a" * 64, 400, "invalid_digest"),  # the directory's name, not a digest
        ("sha256:" + "g" * 64, 400, "invalid_digest"),
    ],
)
async def test_bad_and_unknown_digests_are_problems(
    built: Artifact, tmp_path: Path, digest: str, status: int, code: str
) -> None:
    app, store = _app(built, tmp_path)
    await _record(store, built.digest, built.location)
    async with _client(app) as client:
        r = await client.get(f"/fleet/v1/artifacts/{digest}")
    assert r.status_code == status
    assert r.headers["content-type"] == problems.PROBLEM
    assert r.json()["error"] == code


async def test_only_recorded_directory_artifacts_in_the_store_are_sent(
    built: Artifact, tmp_path: Path
) -> None:
    app, store = _app(built, tmp_path)
    artifacts = Path(built.location).parent
    planted: list[Path] = []

    def plant(digest: str) -> None:
        """A directory in the builder's store under ``digest``: only the record may open it."""
        path = artifacts / artifact_dirname(digest)
        shutil.copytree(built.location, path, symlinks=True)
        planted.append(path)

    # In the store but recorded by no revision.
    unrecorded = "sha256:" + "e" * 64
    plant(unrecorded)
    # In the store, but the revision recorded under it is an image.
    image = "sha256:" + "b" * 64
    plant(image)
    await _record(store, image, "registry.example/svc@" + image, kind="oci-image")
    # A directory revision whose record names another place: only the builder's own path for
    # the digest is ever sent, and there is none.
    elsewhere = "sha256:" + "c" * 64
    (tmp_path / "elsewhere").mkdir()
    await _record(store, elsewhere, str(tmp_path / "elsewhere"))
    # A recorded digest whose entry in the store is a link to somewhere else.
    linked = "sha256:" + "d" * 64
    await _record(store, linked, str(artifacts / artifact_dirname(linked)))
    os.symlink(tmp_path / "elsewhere", artifacts / artifact_dirname(linked))
    planted.append(artifacts / artifact_dirname(linked))
    try:
        async with _client(app) as client:
            for digest in (unrecorded, image, elsewhere, linked, built.digest):
                r = await client.get(f"/fleet/v1/artifacts/{digest}")
                assert r.status_code == 404, digest
                assert r.json()["error"] == "unknown_artifact"
            await _record(store, unrecorded, str(artifacts / artifact_dirname(unrecorded)))
            r = await client.get(f"/fleet/v1/artifacts/{unrecorded}")
            assert r.status_code == 200  # once recorded, it is sent
    finally:
        for path in planted:
            if path.is_symlink():
                path.unlink()
            else:
                make_removable(path)
                shutil.rmtree(path)


async def test_the_client_certificate_check_guards_the_route(
    built: Artifact, tmp_path: Path
) -> None:
    app, store = _app(built, tmp_path)
    await _record(store, built.digest, built.location)
    async with _client(app, region=None) as client:
        r = await client.get(f"/fleet/v1/artifacts/{built.digest}")
    assert r.status_code == 403
    assert r.headers["content-type"] == problems.PROBLEM
