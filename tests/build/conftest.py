"""Fixtures for the build tests (the Docker Engine is ``tests/docker_engine.py``'s)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import MANIFEST, GitRepo, GitServer


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    """A repository with one commit on main: a manifest and an app."""
    r = GitRepo(tmp_path / "repo")
    r.write("shipyard.toml", MANIFEST)
    r.write("app.py", "print('hello')\n")
    r.commit("initial")
    return r


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def git_server(tmp_path: Path) -> Iterator[GitServer]:
    server = GitServer(tmp_path)
    yield server
    server.close()
