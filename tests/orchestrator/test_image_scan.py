"""The scan stage on image artifacts, against a real Docker Engine and the real PyPA database: the
image's files are exported from the engine, the SBOM lists its Python, Debian and Alpine
packages, a known advisory blocks the deployment, and a missing image or an exporter-less server
fails closed. No container or temporary directory is left behind."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from shipyard.build.base import Artifact
from shipyard.build.docker import DockerBuilderConfig
from shipyard.build.fake import FakeBuilder
from shipyard.build.image_export import SCAN_LABEL, ImageExporter
from shipyard.security.gate import SecurityGate
from tests.build.images import MIXED_ROOTFS, build_image
from tests.orchestrator.world import PipelineWorld
from tests.shared_data import find_pypa_db

pytestmark = pytest.mark.docker

SAFE_ROOTFS = {
    **{k: v for k, v in MIXED_ROOTFS.items() if "langchain" not in k},
    "usr/lib/python3/site-packages/requests-2.32.3.dist-info/METADATA": (
        b"Metadata-Version: 2.1\nName: requests\nVersion: 2.32.3\n"
    ),
}
OS_PURLS = {
    "pkg:deb/debian/libssl3@3.0.11-1~deb12u2?arch=amd64&distro=debian-12",
    "pkg:deb/debian/tzdata@2024a-0%2Bdeb12u1?arch=all&distro=debian-12",
    "pkg:apk/alpine/musl@1.2.4-r2?arch=x86_64",
    "pkg:apk/alpine/libcrypto3@3.1.4-r5?arch=x86_64",
}


@pytest.fixture
def engine(docker_engine: str) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=docker_engine)
    yield client
    client.close()


@pytest.fixture
async def world(
    tmp_path: Path, docker_engine: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[PipelineWorld]:
    # The scan's temporary directories go under this test's own directory, so ``scan_dirs``
    # sees only them (other xdist workers scan images at the same time).
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    db = find_pypa_db()
    if db is None:
        pytest.fail("PyPA advisory database not found; set SHIPYARD_TEST_OSV_DB")
    w = PipelineWorld(tmp_path, builder=FakeBuilder(root=tmp_path / "artifacts"))
    w.gate = SecurityGate(data_dir=tmp_path, db_path=db)
    w.attestations_dir = tmp_path / "attestations"
    w.pipeline = w.new_pipeline()
    w.pipeline.deps.image_exporter = ImageExporter(DockerBuilderConfig(base_url=docker_engine))
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()


def builds_image(world: PipelineWorld, image_id: str) -> None:
    """The world's builder returns ``image_id`` as a docker builder would."""
    real_build = world.builder.build

    async def image_build(request: Any) -> Artifact:
        artifact = await real_build(request)
        return dataclasses.replace(
            artifact, kind="oci-image", builder="docker", digest=image_id, location=image_id
        )

    world.builder.build = image_build  # type: ignore[method-assign]


def scan_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("shipyard-scan-*")}


def scan_stage(doc: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in doc["stages"] if s["name"] == "scan")


def sbom_purls(path: str) -> set[str]:
    return {c["purl"] for c in json.loads(Path(path).read_text())["components"]}


async def test_a_vulnerable_image_is_blocked_and_its_sbom_lists_every_kind(
    world: PipelineWorld, engine: docker.DockerClient
) -> None:
    # An image of its own, so its scan containers are this test's alone on the shared engine.
    image_id = build_image(engine, {**MIXED_ROOTFS, "test-marker": uuid.uuid4().hex.encode()})
    builds_image(world, image_id)
    before = scan_dirs()
    doc = await world.deploy("aaaa1111")
    assert doc["status"] == "Failed"
    assert doc["error"]["type"] == "SecurityScanFailed"
    stage = scan_stage(doc)
    findings = stage["detail"]["findings"]
    assert {f["package"] for f in findings} == {"langchain"}
    assert "PYSEC-2023-151" in {f["advisory_id"] for f in findings}
    assert stage["detail"]["export"]["files"] == 4  # dpkg, apk, os-release, METADATA
    assert world.attestations_dir is not None
    kept = world.attestations_dir / f"{image_id.removeprefix('sha256:')}.cdx.json"
    assert sbom_purls(str(kept)) == {
        "pkg:pypi/langchain@0.0.170",
        *OS_PURLS,
    }
    assert world.runtime.started == []
    scans = engine.containers.list(all=True, filters={"label": SCAN_LABEL, "ancestor": image_id})
    assert scans == []
    assert scan_dirs() == before


async def test_a_clean_image_is_scanned_and_signed(
    world: PipelineWorld, engine: docker.DockerClient
) -> None:
    image_id = build_image(engine, SAFE_ROOTFS)
    builds_image(world, image_id)
    doc = await world.deploy("aaaa1111")
    stage = scan_stage(doc)
    assert stage["status"] == "succeeded", doc.get("error")
    assert stage["detail"]["packages"] == 5
    assert stage["detail"]["findings"] == 0
    assert sbom_purls(stage["detail"]["sbom"]) == {"pkg:pypi/requests@2.32.3", *OS_PURLS}
    assert Path(stage["detail"]["provenance"]).is_file()
    assert doc["artifact_digest"] == image_id


async def test_a_missing_image_fails_closed(
    world: PipelineWorld, engine: docker.DockerClient
) -> None:
    # An image of its own: the session's engine is shared by every worker, and another test
    # may be using SAFE_ROOTFS's image right now.
    image_id = build_image(engine, {**SAFE_ROOTFS, "missing": uuid.uuid4().hex.encode()})
    engine.images.remove(image_id, force=True)
    builds_image(world, image_id)
    doc = await world.deploy("aaaa1111")
    assert doc["status"] == "Failed"
    assert doc["error"]["type"] == "SecurityScanFailed"
    assert "does not have it" in doc["error"]["message"]
    assert scan_stage(doc)["detail"]["reason"] == "image_missing"
    assert world.runtime.started == []


async def test_without_an_exporter_an_image_is_refused(
    world: PipelineWorld, engine: docker.DockerClient
) -> None:
    world.pipeline.deps.image_exporter = None
    builds_image(world, build_image(engine, SAFE_ROOTFS))
    doc = await world.deploy("aaaa1111")
    assert doc["status"] == "Failed"
    assert "pass the image's exported root filesystem" in doc["error"]["message"]
    assert scan_stage(doc)["detail"]["reason"] == "not_scannable"
