"""A real OCI registry (the CNCF Distribution server, Debian's ``docker-registry``) on loopback,
for the tests of images on other hosts: the Docker builder pushes to it, a second engine pulls
from it. A pytest plugin, loaded by ``tests/conftest.py`` beside ``tests.docker_engine``.

``oci_registry`` is one registry for the session; ``running_registry`` starts another (e.g. a
fresh, empty one for a single test). Plain HTTP with no authentication: Docker Engine treats
registries on 127.0.0.0/8 as insecure (HTTP allowed) without any daemon flag.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from shipyard.runtime.docker_engine import stop_child

if TYPE_CHECKING:  # the SDK is imported by the tests that use these helpers, not by every test
    import docker

#: What a client sends to be answered with a manifest in any of the formats an engine pushes.
MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)


@dataclass(frozen=True)
class Registry:
    """A running registry: ``address`` is ``127.0.0.1:PORT`` (what image references start with),
    ``storage`` its filesystem storage root."""

    address: str
    storage: Path

    def get(self, path: str, accept: str = MANIFEST_ACCEPT) -> tuple[int, dict[str, str], bytes]:
        """``GET path`` on the registry's API: status, headers (lower-case names), body."""
        host, port = self.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("GET", path, headers={"Accept": accept})
            response = conn.getresponse()
            body = response.read()
            headers = {name.lower(): value for name, value in response.getheaders()}
            return response.status, headers, body
        finally:
            conn.close()


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The session's registry (shared: tests use their own repository names or tags)."""
    with running_registry(tmp_path_factory.mktemp("registry")) as registry:
        yield registry


@contextlib.contextmanager
def running_registry(work: Path) -> Iterator[Registry]:
    """Start a Distribution server with its own config and storage under ``work`` on a free
    loopback port; yield it once ``GET /v2/`` answers 200; stop it."""
    binary = shutil.which("docker-registry") or shutil.which("registry")
    if binary is None:
        pytest.skip("the registry is not installed (Debian: apt-get install docker-registry)")
    port = _free_port()
    storage = Path(tempfile.mkdtemp(prefix="registry-", dir=work))
    config = work / f"registry-{port}.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        "storage:\n"
        f"  filesystem:\n    rootdirectory: {storage}\n"
        "  delete:\n    enabled: true\n"
        "http:\n"
        f"  addr: 127.0.0.1:{port}\n"
        # The debug server would otherwise take :5001 on every interface.
        "  debug:\n    addr: ''\n"
    )
    log = (work / f"registry-{port}.log").open("wb")
    proc = subprocess.Popen(
        [binary, "serve", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    registry = Registry(address=f"127.0.0.1:{port}", storage=storage)
    try:
        _wait_until_answering(registry, proc, log.name)
        yield registry
    finally:
        stop_child(proc)
        log.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_answering(registry: Registry, proc: subprocess.Popen[bytes], log: str) -> None:
    # The registry's readiness signal is its API: GET /v2/ answers 200 (no auth configured).
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the registry exited with {proc.returncode}; see {log}")
        with contextlib.suppress(OSError):
            if registry.get("/v2/", accept="application/json")[0] == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the registry did not answer GET /v2/ within 60 s; see {log}")
        time.sleep(0.1)


def build_scratch_image(client: docker.DockerClient, marker: str) -> str:
    """Build a tiny ``FROM scratch`` image whose one file holds ``marker`` (a different marker,
    a different image) straight through the engine; its image id. For impostor images."""
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in (
            ("Dockerfile", b"FROM scratch\nCOPY marker /marker\n"),
            ("marker", marker.encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    image, _ = client.images.build(fileobj=context, custom_context=True, rm=True)
    return str(image.id)


def push(client: docker.DockerClient, image_id: str, repository: str, tag: str) -> str:
    """Tag ``image_id`` as ``repository:tag`` and push it; the manifest digest the registry
    stored (what a deployer would have to know to pin it)."""
    client.images.get(image_id).tag(repository, tag)
    digest = None
    for chunk in client.api.push(repository, tag=tag, stream=True, decode=True):
        if "error" in chunk:
            raise RuntimeError(f"push of {repository}:{tag} failed: {chunk['error']}")
        if isinstance(chunk.get("aux"), dict) and "Digest" in chunk["aux"]:
            digest = str(chunk["aux"]["Digest"])
    if digest is None:
        raise RuntimeError(f"push of {repository}:{tag} reported no digest")
    return digest


class PullFailed(Exception):
    """The engine's pull stream reported an error (its message is this exception's)."""


def pull(client: docker.DockerClient, reference: str) -> str:
    """Pull ``reference`` (``repo:tag`` or ``repo@sha256:...``) and return the image id it
    gave; ``PullFailed`` with the engine's own words (``images.pull`` would swallow them and
    report only that the image is missing)."""
    if "@" in reference:
        repository, _, tag = reference.partition("@")
    else:
        repository, _, tag = reference.rpartition(":")
    for chunk in client.api.pull(repository, tag=tag, stream=True, decode=True):
        if "error" in chunk:
            raise PullFailed(str(chunk["error"]))
    return str(client.images.get(reference).id)
