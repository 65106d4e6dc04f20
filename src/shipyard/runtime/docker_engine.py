"""A Docker Engine to talk to: the one that already answers, or one of our own started for the
occasion. Used by ``shipyard demo --containers`` (``cli/demo_containers.py``), the container
benchmark (``bench/bench_containers.py``) and the tests' session fixture
(``tests/docker_engine.py``), so the three start and stop an engine the same way.

An engine of our own runs ``dockerd --storage-driver=vfs --iptables=false --ip6tables=false
--bridge=none`` (the caller may name another storage driver: the tests use ``overlay2`` where it
works) with its own socket, data root, exec root and pid file under one fresh directory,
so it never touches (or collides with) any other engine on the machine; with ``--bridge=none``
containers must use host networking. It is stopped (SIGTERM, then SIGKILL after 30 s) and its
directory removed when the ``with`` block ends.

Readiness is the engine's own API: ``GET /_ping`` until it answers 200 (bounded). The probe is a
raw unix socket, closed every time, because SDK clients that failed to connect leak theirs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

#: Where the SDK looks when ``DOCKER_HOST`` is unset.
DEFAULT_ADDRESS = "unix:///var/run/docker.sock"
#: dockerd's flags for an engine of our own on this kind of machine (no iptables, no bridge).
DOCKERD_FLAGS = ("--iptables=false", "--ip6tables=false", "--bridge=none")
#: The storage driver of an engine of our own unless the caller names another: ``vfs`` works on
#: any filesystem (every layer and container is a full copy); ``overlay2`` shares layers, but
#: needs a kernel and a data root that support overlay mounts.
STORAGE_DRIVER = "vfs"
#: Seconds an engine of our own may take to answer ``/_ping``.
START_TIMEOUT = 60.0


class EngineUnavailable(RuntimeError):
    """No engine answers and none can be started here (``dockerd`` missing or failing)."""


def answers(address: str) -> bool:
    """Whether the engine at ``address`` (``unix://...``) answers ``GET /_ping`` with 200.
    Other schemes (``tcp://``) are not probed here: False."""
    if not address.startswith("unix://"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(5)
            conn.connect(address.removeprefix("unix://"))
            conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = conn.recv(4096).split(b"\r\n", 1)[0]
    except OSError:
        return False
    return status_line.startswith(b"HTTP/1.") and b" 200 " in status_line


@contextlib.contextmanager
def own_engine(log_path: Path | None = None, storage_driver: str = STORAGE_DRIVER) -> Iterator[str]:
    """Start a Docker Engine of our own (see the module docstring) and yield its ``unix://``
    address; stop it and remove its directory on exit. ``log_path`` receives dockerd's output
    (default: ``dockerd.log`` in its directory, removed with it). EngineUnavailable when
    ``dockerd`` is not installed, exits (a ``storage_driver`` this machine cannot use makes it
    exit at start), or does not answer within ``START_TIMEOUT``."""
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise EngineUnavailable("dockerd is not installed (Debian: apt-get install docker.io)")
    # Short paths: a unix socket path must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="sy-dockerd-"))
    sock = root / "docker.sock"
    log_path = log_path or root / "dockerd.log"
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [
            dockerd,
            f"--storage-driver={storage_driver}",
            *DOCKERD_FLAGS,
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
        _wait_until_answering(address, proc, log_path)
        yield address
    finally:
        stop_child(proc)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def stop_child(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM a server we started (dockerd here, the test registry too), SIGKILL it if it has
    not exited within ``timeout`` seconds, and reap it."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def ensure_engine(log_path: Path | None = None) -> Iterator[tuple[str, bool]]:
    """An engine that answers: ``DOCKER_HOST`` (or the default socket) when it does, else one of
    our own (``own_engine``). Yields ``(address, started)``; only an engine started here is
    stopped on exit. A ``tcp://`` ``DOCKER_HOST`` is trusted as given (the SDK will say if it
    does not answer)."""
    configured = os.environ.get("DOCKER_HOST")
    if configured and (not configured.startswith("unix://") or answers(configured)):
        yield configured, False
        return
    if not configured and answers(DEFAULT_ADDRESS):
        yield DEFAULT_ADDRESS, False
        return
    with own_engine(log_path) as address:
        yield address, True


def _wait_until_answering(address: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not answers(address):
        if proc.poll() is not None:
            raise EngineUnavailable(f"dockerd exited with {proc.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise EngineUnavailable(f"dockerd did not answer in {START_TIMEOUT:.0f} s; see {log}")
        time.sleep(0.1)
