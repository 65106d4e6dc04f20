"""The ``database`` fixture: every store test runs on SQLite (``None``: the data directory's
file) and on PostgreSQL (a fresh database on the session's own server, ``tests/postgres.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str | None:
    """``--database`` for the backend under test."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_url")
    return url
