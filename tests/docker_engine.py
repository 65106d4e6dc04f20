"""The session's own Docker Engine (``docker_engine``), for every test that needs one: the
builder's, the container runtime's, the end-to-end container suite's. A pytest plugin, loaded by
``tests/conftest.py``; started on first use, stopped at the end of the session. How the engine is
started is ``shipyard.runtime.docker_engine.own_engine``, shared with the container demo and the
benchmark.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.runtime.docker_engine import EngineUnavailable, own_engine


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
    """Start a dockerd of its own (log in ``log_dir``), yield its ``unix://`` address, stop it.

    Storage driver ``overlay2`` where the kernel and the temporary directory allow it (a layer,
    a build step or a container is then an overlay mount), else ``vfs``, which copies the whole
    filesystem for each of them: on vfs the container suites spent their time copying image
    trees (every build step and every replica of tests/e2e/test_containers.py)."""
    if shutil.which("dockerd") is None:
        pytest.skip("dockerd is not installed (Debian: apt-get install docker.io)")
    with contextlib.ExitStack() as stack:
        try:
            address = stack.enter_context(own_engine(log_dir / "dockerd.log", "overlay2"))
        except EngineUnavailable:  # no overlay mounts here (e.g. /tmp on overlayfs): vfs
            address = stack.enter_context(own_engine(log_dir / "dockerd-vfs.log", "vfs"))
        yield address
