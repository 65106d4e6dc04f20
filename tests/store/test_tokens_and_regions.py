"""The token registry and the region registry on both backends (the ``database`` fixture): what
``TokenService`` and ``RegionService`` rely on — one revocation kept, the limit written by
replicas starting together, a join token used once by racing agents."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from shipyard.errors import Conflict, NotFound
from shipyard.store.engine import open_engine
from shipyard.store.regions import JoinTokenRow, RegionStore
from shipyard.store.tokens import TokenRow, TokenStore


@pytest.fixture
def engine(database: str | None, tmp_path: Path) -> Iterator[Engine]:
    e = open_engine(database, tmp_path)
    yield e
    e.dispose()


def race(n: int, fn: Callable[[int], object]) -> list[object]:
    """Run ``fn(i)`` in ``n`` threads released together; their results (or errors)."""
    start = threading.Barrier(n, timeout=60)
    results: list[object] = [None] * n

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = fn(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_tokens_are_recorded_listed_and_revoked_once(engine: Engine) -> None:
    tokens = TokenStore(engine)
    tokens.record(TokenRow("t1", "alice", ("deployment:read",), 1.0, 100.0, "admin"))
    tokens.record(TokenRow("t2", "bob", ("deployment:create:web-*",), 2.0, 100.0))
    with pytest.raises(Conflict):
        tokens.record(TokenRow("t1", "eve", (), 3.0, 100.0))
    assert [t.id for t in tokens.list()] == ["t2", "t1"]
    row, changed = tokens.revoke("t1", by="admin", at=5.0)
    assert changed and row.revoked_at == 5.0
    row, changed = tokens.revoke("t1", by="other", at=6.0)
    assert not changed and (row.revoked_at, row.revoked_by) == (5.0, "admin")
    with pytest.raises(NotFound):
        tokens.revoke("nope", by="admin", at=7.0)
    got = tokens.get("t2")
    assert got is not None and got.permissions == ("deployment:create:web-*",)


def test_replicas_starting_together_both_write_the_token_limit(engine: Engine) -> None:
    tokens = TokenStore(engine)
    assert tokens.max_ttl_seconds() is None
    results = race(4, lambda i: tokens.set_max_ttl_seconds(3600 * (i + 1)))
    assert results == [None] * 4
    assert tokens.max_ttl_seconds() in {3600, 7200, 10800, 14400}


def test_a_join_token_joins_one_of_two_racing_agents(engine: Engine) -> None:
    regions = RegionStore(engine)
    regions.add("eu", JoinTokenRow("j1", "ab" * 32, "eu", 1.0, 100.0), at=1.0)
    with pytest.raises(Conflict):
        regions.add("eu", JoinTokenRow("j2", "cd" * 32, "eu", 1.0, 100.0), at=1.0)
    joined = race(4, lambda i: regions.join("j1", "eu", f"serial-{i}", f"https://a{i}", at=2.0))
    assert sorted(map(str, joined)) == ["False", "False", "False", "True"]
    region = regions.get("eu")
    assert region is not None and region.joined_at == 2.0 and region.cert_serial is not None
    assert regions.renew("eu", region.cert_serial, "serial-new", "https://b")
    renewed = regions.get("eu")
    assert renewed is not None and renewed.accepts(region.cert_serial)
    assert not regions.renew("eu", "stale-serial", "serial-x", "https://c")
    assert [r.name for r in regions.list()] == ["eu"]
    assert regions.remove("eu") and not regions.remove("eu")
    assert regions.get("eu") is None
