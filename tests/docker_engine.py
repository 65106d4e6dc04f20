"""The session's own Docker Engine (``docker_engine``), for every test that needs one: the
builder's, the container runtime's, the end-to-end container suite's. A pytest plugin, loaded by
``tests/conftest.py``; started on first use, stopped at the end of the session. How the engine is
started is ``shipyard.runtime.docker_engine.own_engine``, shared with the container demo and the
benchmark.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from shipyard.runtime.docker_engine import own_engine


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Docker Engine of our own for the session: own socket, data root and exec root, so
    it never touches (or collides with) any other engine. Yields its ``unix://`` address."""
    if shutil.which("dockerd") is None:
        pytest.skip("dockerd is not installed (Debian: apt-get install docker.io)")
    with own_engine(tmp_path_factory.mktemp("dockerd") / "dockerd.log") as address:
        yield address
