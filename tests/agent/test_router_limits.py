"""Issue 10's check on a real agent: 1,100 idle sockets against one service leave the other
services and the agent's API answering.

The agent runs as ``shipyard agent`` does in production (its own process, the real CLI, replicas
of ``replica_app.py`` in the default sandbox), started with a soft descriptor limit of 1,024 (the
common default, at which the flood used to take everything down) and a cap of 500 connections
per service. The test raises its own soft limit so that it can hold 1,100 sockets itself.
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard.agent.server import Agent
from shipyard.routing.limits import RouterLimits
from shipyard.runtime.base import EntrySpec
from tests.agent.helpers import TRUSTED_KEY, eventually, make_artifact, running_agent, spec_for

FLOOD = 1100
PER_SERVICE = 500


class RunningAgent:
    def __init__(self, process: subprocess.Popen[bytes], api: str, token: str) -> None:
        self.process = process
        self.api = httpx.AsyncClient(
            base_url=api, headers={"authorization": f"Bearer {token}"}, timeout=10
        )

    async def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return await self.api.request(method, path, json=body)

    async def serve(self, service: str, artifact: Path) -> str:
        """Start one routable replica of ``service`` and route all to it; its router's URL."""
        # x-shipyard-revision on: the calm service's answers show they came through its router.
        spec = replace(spec_for(artifact, service=service), entry=EntrySpec(revision_header=True))
        r = await self.call("PUT", f"/v1/services/{service}/revisions/v1", spec.to_dict())
        assert r.status_code == 200, r.text
        ids = [x["replica_id"] for x in r.json()["replicas"]]
        r = await self.call(
            "POST", f"/v1/services/{service}/routable", {"replica_ids": ids, "routable": True}
        )
        assert r.status_code == 200, r.text

        async def routed() -> bool:
            r = await self.call("PUT", f"/v1/services/{service}/weights", {"weights": {"v1": 100}})
            return r.status_code == 200

        await eventually(routed, what=f"{service} routed")
        return str((await self.call("GET", f"/v1/services/{service}")).json()["url"])

    async def router_stats(self, service: str) -> dict[str, int]:
        state = (await self.call("GET", f"/v1/services/{service}")).json()
        stats: dict[str, int] = state["router"]["connections"]
        return stats


def _soft_nofile_1024() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """This test process may hold the flood's sockets (and its own files) at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < FLOOD + 200:
        pytest.skip(f"the hard descriptor limit ({hard}) is below what the flood needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[RunningAgent]:
    data = tmp_path / "data"
    key = tmp_path / "trusted.pub"
    key.write_text(TRUSTED_KEY)
    log = (tmp_path / "agent.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "shipyard.cli.main", "agent", "--data-dir", str(data),
         "--trusted-key", str(key), "--router-max-connections", str(PER_SERVICE),
         # the flood's sockets stay idle for the whole test, not cut at the 10 s head timeout
         "--router-head-timeout", "600"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=_soft_nofile_1024,
    )  # fmt: skip
    info = data / "agents" / "local" / "agent.json"

    async def started() -> dict[str, Any] | None:
        assert process.poll() is None, (tmp_path / "agent.log").read_text()
        return json.loads(info.read_text()) if info.exists() else None

    try:
        found = await eventually(started, what="the agent starting")
        token = (data / "agents" / "local" / "agent.token").read_text().strip()
        running = RunningAgent(process, found["api_url"], token)
        yield running
        await running.api.aclose()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    assert (
        "descriptor limit (RLIMIT_NOFILE) raised from 1024" in (tmp_path / "agent.log").read_text()
    )


def _open_idle(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(sock)
    return socks


async def test_a_thousand_idle_sockets_on_one_service_leave_the_rest_answering(
    agent: RunningAgent, tmp_path: Path, many_descriptors: None
) -> None:
    artifact = make_artifact(tmp_path, "v1")
    flooded = await agent.serve("flooded", artifact)
    calm = await agent.serve("calm", artifact)
    port = int(flooded.rsplit(":", 1)[1])
    idle = await asyncio.to_thread(_open_idle, port, FLOOD)
    try:

        async def capped() -> dict[str, int] | None:
            stats = await agent.router_stats("flooded")
            return stats if stats["refused"] >= FLOOD - PER_SERVICE else None

        stats = await eventually(capped, what="the flooded router refusing past its cap")
        assert stats["open"] == PER_SERVICE
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            # The other service answers, on new connections and on a kept-alive one.
            for _ in range(20):
                r = await client.get(f"{calm}/")
                assert r.status_code == 200
                assert r.headers["x-shipyard-revision"] == "v1"
            # The agent's API answers.
            assert (await agent.call("GET", "/v1/health")).status_code == 200
            # The flooded service itself refuses at once rather than hanging.
            r = await client.get(f"{flooded}/")
            assert r.status_code == 503
            assert r.headers["connection"] == "close"
        assert agent.process.poll() is None
        assert (await agent.router_stats("calm"))["refused"] == 0
    finally:
        for sock in idle:
            sock.close()
    # Once the flood is gone the flooded service answers again.
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:

        async def answers() -> bool:
            return (await client.get(f"{flooded}/")).status_code == 200

        await eventually(answers, what="the flooded service answering after the flood")


# -- a service's own limits through the agent API (in process) ------------------------------------


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[Agent, httpx.AsyncClient]]:
    async with running_agent(tmp_path / "data") as pair:
        yield pair


async def test_a_service_gets_its_own_limits_and_keeps_them_across_restarts(
    api: tuple[Agent, httpx.AsyncClient], tmp_path: Path
) -> None:
    agent, client = api
    assert (await client.put("/v1/services/web")).status_code == 200
    r = await client.put(
        "/v1/services/web/limits", json={"response_timeout": 5, "max_connections": 10}
    )
    assert r.status_code == 200, r.text
    assert r.json()["limits"] == {**RouterLimits().to_dict(), "response_timeout": 5.0,
                                  "max_connections": 10}  # fmt: skip
    state = (await client.get("/v1/services/web")).json()
    assert state["router"]["limits"]["max_connections"] == 10
    assert agent.routes["web"].proxy.limits.response_timeout == 5
    restarted = Agent(tmp_path / "data", "local", trusted_key=TRUSTED_KEY)
    try:
        await restarted.restore()
        assert restarted.routes["web"].proxy.limits == agent.routes["web"].proxy.limits
    finally:
        await restarted.close()


@pytest.mark.parametrize(
    "body",
    [{"head_timeout": 0}, {"max_connections": -1}, {"body_timeout": "soon"}, {"timeout": 3}],
    ids=["zero", "negative", "not-a-number", "unknown-field"],
)
async def test_bad_limits_are_a_422_and_change_nothing(
    api: tuple[Agent, httpx.AsyncClient], body: dict[str, Any]
) -> None:
    agent, client = api
    assert (await client.put("/v1/services/web")).status_code == 200
    before = agent.routes["web"].proxy.limits
    r = await client.put("/v1/services/web/limits", json=body)
    assert r.status_code == 422, r.text
    assert agent.routes["web"].proxy.limits == before
    assert (await client.put("/v1/services/nope/limits", json={})).status_code == 404
