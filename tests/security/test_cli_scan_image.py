"""``shipyard scan --image`` against a real Docker Engine and the real PyPA database: the image's
Python, Debian and Alpine packages are scanned as the deploy gate scans them, the engine comes
from the builders' settings, and bad input (PATH and --image, an unknown image) exits 2."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from typer.testing import CliRunner

from shipyard.cli.security import security_app
from tests.build.images import MIXED_ROOTFS, build_image

pytestmark = pytest.mark.docker

runner = CliRunner()


@pytest.fixture
def engine(docker_engine: str) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=docker_engine)
    yield client
    client.close()


@pytest.fixture
def builders(tmp_path: Path, docker_engine: str) -> Path:
    path = tmp_path / "builders.json"
    path.write_text(json.dumps({"docker": {"base_url": docker_engine}}))
    return path


def test_scan_image_finds_the_advisory_and_lists_os_packages(
    engine: docker.DockerClient, builders: Path, pypa_db_path: Path
) -> None:
    build_image(engine, MIXED_ROOTFS, tag="shipyard-test/mixed:1")
    result = runner.invoke(
        security_app,
        [
            "scan",
            "--image",
            "shipyard-test/mixed:1",
            "--builders-config",
            str(builders),
            "--db",
            str(pypa_db_path),
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 1, result.output  # the critical langchain advisory blocks
    data = json.loads(result.stdout)
    assert data["source"] == "shipyard-test/mixed:1"
    assert data["kind"] == "image"
    assert data["packages"] == 5  # langchain, libssl3, tzdata, musl, libcrypto3
    blocking = [f for f in data["findings"] if f["package"] == "langchain"]
    assert "PYSEC-2023-151" in {f["advisory_id"] for f in blocking}


def test_scan_image_refuses_path_and_image_together(tmp_path: Path) -> None:
    result = runner.invoke(security_app, ["scan", str(tmp_path), "--image", "x:1"])
    assert result.exit_code == 2
    assert "exactly one" in result.output


def test_scan_of_an_unknown_image_exits_2(builders: Path, pypa_db_path: Path) -> None:
    result = runner.invoke(
        security_app,
        [
            "scan",
            "--image",
            "shipyard-test/never-built:1",
            "--builders-config",
            str(builders),
            "--db",
            str(pypa_db_path),
        ],
    )
    assert result.exit_code == 2
    assert "does not have it" in result.output
