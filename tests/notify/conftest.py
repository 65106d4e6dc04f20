"""Fixtures for the notification tests: the store migrated on SQLite and on PostgreSQL
(tests/postgres.py), a sealer, sinks, and an audit log whose appends write the outbox."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from shipyard.audit.log import SqlAuditLog
from shipyard.notify.config import parse_sink
from shipyard.notify.sinks import OutboxWriter, SinkService
from shipyard.security.sealing import Sealer
from shipyard.store.engine import open_engine
from shipyard.store.outbox import OutboxStore

WEBHOOK_SECRET = "whsec-notify-test-0123456789"
SLACK_URL = "https://hooks.slack.test/services/T000/B000/XyZsecretpath"


class Now:
    """A wall clock the test moves (``now``); ``sleep`` returns at once."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.value = start

    def now(self) -> float:
        return self.value

    def monotonic(self) -> float:
        return self.value

    async def sleep(self, seconds: float) -> None:
        self.value += seconds


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    made = open_engine(url, tmp_path)
    yield made
    made.dispose()


@pytest.fixture
def clock() -> Now:
    return Now()


@pytest.fixture
def sinks(engine: Engine, tmp_path: Path, clock: Now) -> SinkService:
    return SinkService(OutboxStore(engine), Sealer.for_dir(tmp_path / "shared"), clock.now)


@pytest.fixture
def audit(engine: Engine, tmp_path: Path, clock: Now) -> SqlAuditLog:
    return SqlAuditLog(engine, tmp_path / "audit.head", on_append=OutboxWriter(clock.now).on_append)


def webhook(name: str = "hook", url: str = "http://receiver.test/in", **over: object) -> object:
    return parse_sink(
        {"name": name, "type": "webhook", "url": url, "secret": WEBHOOK_SECRET, **over}, "test"
    )


def slack(name: str = "team", **over: object) -> object:
    return parse_sink({"name": name, "type": "slack", "url": SLACK_URL, **over}, "test")
