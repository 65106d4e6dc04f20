"""The session's own Docker Engine (``docker_engine``), for every test that needs one: the
builder's, the container runtime's, the end-to-end container suite's. A pytest plugin, loaded by
``tests/conftest.py``; started on first use, stopped at the end of the session.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Docker Engine of our own for the session: own socket, data root and exec root, so
    it never touches (or collides with) any other engine. Yields its ``unix://`` address."""
    with running_engine(tmp_path_factory.mktemp("dockerd")) as address:
        yield address


@pytest.fixture(scope="session")
def other_docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second, independent engine (own data root: it has none of ``docker_engine``'s images):
    the honest stand-in for another host, e.g. one that pulls from a registry."""
    with running_engine(tmp_path_factory.mktemp("dockerd-other")) as address:
        yield address


@contextlib.contextmanager
def running_engine(log_dir: Path) -> Iterator[str]:
    """Start a dockerd of its own (log in ``log_dir``), yield its ``unix://`` address, stop it."""
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        pytest.skip("dockerd is not installed (Debian: apt-get install docker.io)")
    # Short paths: a unix socket path must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="sy-dockerd-"))
    sock = root / "docker.sock"
    log = (log_dir / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        [
            dockerd,
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--host",
            f"unix://{sock}",
            "--data-root",
            str(root / "docker"),
            "--exec-root",
            str(root / "exec"),
            "--pidfile",
            str(root / "docker.pid"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"unix://{sock}"
    try:
        _wait_until_answering(sock, proc, log.name)
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _wait_until_answering(sock: Path, proc: subprocess.Popen[bytes], log: str) -> None:
    # The engine offers no readiness signal but its API: ask GET /_ping until it answers OK
    # (bounded). A raw socket, closed every time: failed SDK clients leak theirs.
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"dockerd exited with {proc.returncode}; see {log}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(5)
                conn.connect(str(sock))
                conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
                status_line = conn.recv(4096).split(b"\r\n", 1)[0]
                if status_line.startswith(b"HTTP/1.") and b" 200 " in status_line:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"dockerd did not answer within 60 s; see {log}")
        time.sleep(0.1)
