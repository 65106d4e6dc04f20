"""The agent's built-in load step (agent/loading.py) against a real router and real upstreams:
requests reach the pinned revision only, count in its metrics exactly, follow the path asked
for, stop at the lease's end, and bad specs are refused (also at the agent's API)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.agent.loading import LoadRun, LoadSpec, LoadStats
from shipyard.routing.proxy import ServiceProxy
from tests.agent.helpers import eventually, running_agent
from tests.routing.conftest import Upstream


@pytest.fixture
async def pair() -> AsyncIterator[tuple[ServiceProxy, Upstream, Upstream]]:
    """A router with stable at 90% and canary at 10%, each a real HTTP upstream."""
    stable, canary = Upstream("stable"), Upstream("canary")
    await stable.start()
    await canary.start()
    proxy = ServiceProxy("svc")
    await proxy.start()
    proxy.configure(
        {"canary": 10, "stable": 90}, [canary.backend("canary"), stable.backend("stable")]
    )
    try:
        yield proxy, stable, canary
    finally:
        await proxy.close()
        await stable.stop()
        await canary.stop()


async def until(predicate: Any, what: str) -> None:
    async def check() -> bool:
        return bool(predicate())

    await eventually(check, timeout=30, what=what)


def settled(stats: LoadStats) -> None:
    assert stats.sent == stats.answered + stats.failed, stats


async def test_load_reaches_the_pinned_revision_only_and_counts_in_its_metrics(
    pair: tuple[ServiceProxy, Upstream, Upstream],
) -> None:
    proxy, stable, canary = pair
    run = LoadRun(proxy, LoadSpec("canary", 500, "/"), host="127.0.0.1:1", lease_seconds=60)
    await until(lambda: canary.requests >= 100, "100 load requests at the canary")
    stats = await run.stop()
    settled(stats)
    assert stable.requests == 0
    metrics = proxy.metrics()
    # Every answer the load got went through the canary's counters; a request ``stop`` cut
    # after the router had its answer (rare: in-flight ones get a second) is counted there too.
    assert stats.answered >= 100
    assert stats.answered <= metrics["canary"].responses <= stats.sent
    assert metrics["canary"].status_2xx == metrics["canary"].responses
    assert stats.status_5xx == 0
    assert "stable" not in metrics or metrics["stable"].requests == 0


async def test_a_canary_answering_500s_is_measured_as_such(
    pair: tuple[ServiceProxy, Upstream, Upstream],
) -> None:
    proxy, stable, canary = pair
    run = LoadRun(proxy, LoadSpec("canary", 200, "/status/500"), host="x", lease_seconds=60)
    await until(lambda: canary.requests >= 20, "20 load requests at the canary")
    stats = await run.stop()
    settled(stats)
    assert stats.status_5xx == stats.answered >= 20
    assert stats.answered <= proxy.metrics()["canary"].status_5xx <= stats.sent
    assert proxy.metrics()["canary"].success_rate == 0.0
    assert stable.requests == 0


async def test_an_unrouted_revision_gets_503s_never_stable(
    pair: tuple[ServiceProxy, Upstream, Upstream],
) -> None:
    proxy, stable, canary = pair
    run = LoadRun(proxy, LoadSpec("canary", 200, "/"), host="x", lease_seconds=60)
    await until(lambda: canary.requests >= 5, "load at the canary")
    proxy.configure({"stable": 100}, [stable.backend("stable")])  # the canary loses its weight
    answered = run.stats.answered
    await until(lambda: run.stats.status_5xx >= 10, "503s once the canary is unrouted")
    stats = await run.stop()
    settled(stats)
    assert stable.requests == 0
    assert stats.answered > answered


async def test_the_load_stops_when_its_lease_runs_out(
    pair: tuple[ServiceProxy, Upstream, Upstream],
) -> None:
    proxy, _, canary = pair
    run = LoadRun(proxy, LoadSpec("canary", 100, "/"), host="x", lease_seconds=0.5)
    await until(lambda: not run.running, "the load to end with its lease")
    sent = run.stats.sent
    assert sent > 0
    stats = await run.stop()
    settled(stats)
    assert stats.sent == sent  # nothing was sent after the lease ran out
    assert canary.requests >= stats.answered > 0


@pytest.mark.parametrize(
    ("revision", "rps", "path", "message"),
    [
        pytest.param("v2", 0, "/", "rps must be in", id="zero-rps"),
        pytest.param("v2", 1000.5, "/", "rps must be in", id="above-1000"),
        pytest.param("v2", 5, "http://elsewhere.example/", "path must start with /", id="url"),
        pytest.param("v2", 5, "/a b", "path must start with /", id="space"),
        pytest.param("v2", 5, "/" + "a" * 2048, "path must start with /", id="too-long"),
        pytest.param("", 5, "/", "revision must be", id="no-revision"),
    ],
)
def test_bad_specs_are_refused(revision: str, rps: float, path: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoadSpec(revision, rps, path)


async def test_the_agent_api_drives_renews_and_stops_a_load(tmp_path: Path) -> None:
    canary = Upstream("canary")
    await canary.start()
    try:
        async with running_agent(tmp_path / "data") as (agent, client):
            route = await agent.ensure_service("svc")
            route.proxy.configure({"v2": 100}, [canary.backend("v2")])
            bad = await client.put("/v1/services/svc/load", json={"revision": "v2", "rps": 5000})
            assert bad.status_code == 422
            assert "rps" in bad.text
            host = await client.put(
                "/v1/services/svc/load",
                json={"revision": "v2", "rps": 5, "path": "/", "host": "evil.example"},
            )
            assert host.status_code == 422  # no field to aim it anywhere else
            missing = await client.put("/v1/services/nope/load", json={"revision": "v2", "rps": 5})
            assert missing.status_code == 404
            assert agent.loads == {}
            body = {"revision": "v2", "rps": 200, "path": "/", "lease_seconds": 60}
            r = await client.put("/v1/services/svc/load", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["load"]["running"] is True
            run = agent.loads["svc"]
            await until(lambda: canary.requests >= 10, "load through the agent")
            again = await client.put("/v1/services/svc/load", json={**body, "lease_seconds": 30})
            assert again.status_code == 200
            assert agent.loads["svc"] is run  # the same load, its lease renewed
            stopped = await client.delete("/v1/services/svc/load")
            assert stopped.json()["load"]["running"] is False
            assert agent.loads == {}  # answered at once; requests in flight finish after
            final = await run.stop()
            settled(final)
            assert final.sent >= 10
            assert stopped.json()["load"]["answered"] <= final.answered <= canary.requests
    finally:
        await canary.stop()


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/chunked", id="chunked"),
        pytest.param("/close-delimited", id="close-delimited"),
        pytest.param("/big/300000", id="large-body"),
        pytest.param("/status/204", id="no-body"),
    ],
)
async def test_every_response_framing_is_read_to_its_end(
    pair: tuple[ServiceProxy, Upstream, Upstream], path: str
) -> None:
    proxy, _, _ = pair
    run = LoadRun(proxy, LoadSpec("canary", 200, path), host="x", lease_seconds=60)
    await until(lambda: run.stats.answered >= 20, f"20 answers for {path}")
    assert run.stats.failed == 0  # nothing misread so far: every answer was framed right
    stats = await run.stop()
    settled(stats)
    assert stats.status_5xx == 0
    assert proxy.metrics()["canary"].responses >= stats.answered
