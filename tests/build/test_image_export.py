"""ImageExporter against a real Docker Engine: an image's filesystem streams out of a container
that is created, never started, and always removed; a missing image or an unreachable engine is
a SecurityScanFailed with its reason. Hostile images: symlinks out and huge files are skipped,
and nothing is written outside the extraction directory."""

from __future__ import annotations

import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import docker
import pytest

from shipyard.build.docker import DockerBuilderConfig
from shipyard.build.image_export import SCAN_LABEL, ImageExporter
from shipyard.build.registry import BuildConfig
from shipyard.errors import SecurityScanFailed
from shipyard.orchestrator.image_scan import export_into
from shipyard.security import inventory
from shipyard.security.rootfs import ExtractLimits

from .images import LANGCHAIN_DIST_INFO, LANGCHAIN_METADATA, MIXED_ROOTFS, build_image

pytestmark = pytest.mark.docker


@pytest.fixture
def engine(docker_engine: str) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=docker_engine)
    yield client
    client.close()


@pytest.fixture
def exporter(docker_engine: str) -> ImageExporter:
    # As the server makes it: from the docker builder's settings.
    return ImageExporter.from_build_config(
        BuildConfig(data_dir=Path("/nonexistent"), builders={"docker": {"base_url": docker_engine}})
    )


def scan_containers(engine: docker.DockerClient, image: str) -> list[object]:
    """The scan containers of ``image`` still there (the session's engine is shared by every
    xdist worker: other tests' exports may be under way, so each test exports its own image)."""
    return list(engine.containers.list(all=True, filters={"label": SCAN_LABEL, "ancestor": image}))


def own(files: dict[str, bytes]) -> dict[str, bytes]:
    """``files`` plus a marker only this test's image holds."""
    return {**files, "test-marker": uuid.uuid4().hex.encode()}


def test_exports_the_image_filesystem_and_removes_the_container(
    engine: docker.DockerClient, exporter: ImageExporter
) -> None:
    image = build_image(engine, own(MIXED_ROOTFS))
    seen: dict[str, int] = {}

    def consume(stream: IO[bytes]) -> int:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                seen[member.name] = member.size
        return len(seen)

    assert exporter.export(image, consume) == len(seen)
    for path, data in MIXED_ROOTFS.items():
        assert seen[path] == len(data)
    assert scan_containers(engine, image) == []


def test_the_container_is_removed_when_the_consumer_fails(
    engine: docker.DockerClient, exporter: ImageExporter
) -> None:
    image = build_image(engine, own(MIXED_ROOTFS))

    def consume(stream: IO[bytes]) -> None:
        stream.read(512)
        raise SecurityScanFailed("stop here", vulnerabilities=0, reason="test")

    with pytest.raises(SecurityScanFailed, match="stop here"):
        exporter.export(image, consume)
    assert scan_containers(engine, image) == []


def test_extracts_only_what_the_scanner_reads(
    engine: docker.DockerClient, exporter: ImageExporter, tmp_path: Path
) -> None:
    image = build_image(engine, MIXED_ROOTFS)
    dest = tmp_path / "rootfs"
    dest.mkdir()
    report = export_into(exporter, image, dest)
    written = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert written == set(MIXED_ROOTFS) - {"app/main.py"}
    assert report.files == 4
    assert report.members > report.files  # the whole stream was read
    kinds = {p.ecosystem for p in inventory.from_tree(dest).packages}
    assert kinds == {"PyPI", "Debian", "Alpine"}


def test_a_hostile_image_writes_nothing_outside_and_skips_links_and_huge_files(
    engine: docker.DockerClient, exporter: ImageExporter, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_text("Name: leaked\nVersion: 6.6.6\n")
    image = build_image(
        engine,
        {
            LANGCHAIN_DIST_INFO: LANGCHAIN_METADATA.encode(),
            "usr/lib/python3/site-packages/huge-1.0.dist-info/METADATA": b"x" * (2 << 20),
            "opt/real/pwn-1.0.dist-info/METADATA": b"Name: pwn\nVersion: 1.0\n",
        },
        symlinks={
            "usr/lib/python3/site-packages/leak-1.0.dist-info/METADATA": str(secret),
            "var/lib/dpkg/status": "../../../" + str(secret),
            "etc/os-release": "../usr/lib/os-release",
            # A metadata directory that is a link out: its target is never listed or read.
            "opt/link.dist-info": str(outside),
        },
    )
    dest = tmp_path / "rootfs"
    dest.mkdir()
    report = export_into(exporter, image, dest, ExtractLimits(max_file_bytes=1 << 20))
    assert {p.name for p in outside.iterdir()} == {"secret"}
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    skipped = dict(report.skipped)
    assert skipped["usr/lib/python3/site-packages/leak-1.0.dist-info/METADATA"] == "link"
    assert skipped["var/lib/dpkg/status"] == "link"
    assert skipped["etc/os-release"] == "link"
    assert skipped["usr/lib/python3/site-packages/huge-1.0.dist-info/METADATA"].startswith(
        "larger than 1048576 bytes"
    )
    names = {(p.name, p.version) for p in inventory.from_tree(dest).packages}
    assert names == {("langchain", "0.0.170"), ("pwn", "1.0")}
    assert scan_containers(engine, image) == []


def test_a_missing_image_fails_closed(exporter: ImageExporter) -> None:
    with pytest.raises(SecurityScanFailed, match="does not have it") as info:
        exporter.export("sha256:" + "0" * 64, lambda stream: None)
    assert info.value.detail["reason"] == "image_missing"


def test_an_unreachable_engine_fails_closed(tmp_path: Path) -> None:
    gone = ImageExporter(DockerBuilderConfig(base_url=f"unix://{tmp_path}/no.sock"))
    with pytest.raises(SecurityScanFailed, match="unreachable") as info:
        gone.export("sha256:" + "0" * 64, lambda stream: None)
    assert info.value.detail["reason"] == "engine_unreachable"
