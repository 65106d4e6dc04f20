"""End-to-end fixtures: each test gets its own data directory, ``shipyard serve`` (which starts the
region's agent) and a git repository of the example app; everything is stopped afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.cli.demo import make_example_repo
from tests.e2e.support import Server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "data").start()
    try:
        yield s
    finally:
        s.stop()
        s.stop_agent()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_example_repo(tmp_path / "hello-repo")
