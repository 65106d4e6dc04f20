"""The agent's weights endpoint with sticky keys: real replicas of the example app behind the
agent's router, driven in-process through its API (``httpx.ASGITransport``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import httpx
import pytest

from shipyard.agent.server import Agent
from shipyard.runtime.base import RevisionSpec
from tests.agent.helpers import running_agent, sign


def artifact(tmp: Path, version: str) -> Path:
    d = tmp / version
    d.mkdir()
    src = resources.files("shipyard.examples") / "hello"
    (d / "app.py").write_text((src / "app.py").read_text())
    (d / "version.txt").write_text(version + "\n")
    return d


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[Agent, httpx.AsyncClient]]:
    async with running_agent(tmp_path / "data") as pair:
        yield pair


async def start(client: httpx.AsyncClient, tmp: Path, revision: str) -> None:
    spec = sign(
        RevisionSpec.from_dict(
            {
                "service": "hello",
                "revision": revision,
                "artifact_digest": "sha256:" + "0" * 64,
                "artifact_location": str(artifact(tmp, revision)),
                "argv": ["python3", "app.py"],
                "env": {},
                "replicas": 1,
                # Which side answered: the router's x-shipyard-revision.
                "entry": {"revision_header": True},
            }
        )
    )
    r = await client.put(f"/v1/services/hello/revisions/{revision}", json=spec.to_dict())
    assert r.status_code == 200, r.text
    ids = [x["replica_id"] for x in r.json()["replicas"]]
    for port in (x["port"] for x in r.json()["replicas"]):
        await healthy(port)  # what the orchestrator's health gate ensures before routing
    r = await client.post(
        "/v1/services/hello/routable", json={"replica_ids": ids, "routable": True}
    )
    assert r.status_code == 200, r.text


async def healthy(port: int) -> None:
    async with httpx.AsyncClient(timeout=5) as c, asyncio.timeout(15):
        while True:
            try:
                if (await c.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                await asyncio.sleep(0.05)


async def served_by(url: str, user: str) -> str:
    # A fresh connection per request: each user is a different client.
    async with httpx.AsyncClient(timeout=5) as c:
        for _ in range(100):  # the app may still be binding its port
            try:
                r = await c.get(url, headers={"x-user": user})
            except httpx.TransportError:
                continue
            if r.status_code == 200:
                return r.headers["x-shipyard-revision"]
    raise AssertionError("the service never answered")


async def test_sticky_users_keep_their_side_and_only_move_to_the_canary(
    agent: tuple[Agent, httpx.AsyncClient], tmp_path: Path
) -> None:
    a, client = agent
    await start(client, tmp_path, "stable")
    await start(client, tmp_path, "canary")
    users = [f"user-{i}" for i in range(40)]
    url = a.url(a.routes["hello"])
    sides: dict[int, dict[str, str]] = {}
    for weight in (10, 50, 90):
        r = await client.put(
            "/v1/services/hello/weights",
            json={"weights": {"canary": weight, "stable": 100 - weight}, "sticky_header": "x-user"},
        )
        assert r.status_code == 200, r.text
        sides[weight] = {u: await served_by(url, u) for u in users}
        again = {u: await served_by(url, u) for u in users}
        assert again == sides[weight]  # the same key always lands on the same side
        assert sides[weight] == {u: a.routes["hello"].proxy.sticky_revision(u) for u in users}
    for low, high in ((10, 50), (50, 90)):
        moved = {u for u in users if sides[low][u] != sides[high][u]}
        assert all(sides[low][u] == "stable" and sides[high][u] == "canary" for u in moved)
    state = (await client.get("/v1/services/hello")).json()
    assert state["sticky"] == {"header": "x-user", "cookie": None}
    saved = json.loads((a.dir / "state.json").read_text())
    assert saved["services"]["hello"]["sticky_header"] == "x-user"
    # Weights without a sticky key clear it.
    r = await client.put("/v1/services/hello/weights", json={"weights": {"canary": 100}})
    assert (await client.get("/v1/services/hello")).json()["sticky"]["header"] is None


async def test_a_bad_sticky_name_is_refused_and_nothing_changes(
    agent: tuple[Agent, httpx.AsyncClient], tmp_path: Path
) -> None:
    a, client = agent
    await start(client, tmp_path, "stable")
    r = await client.put("/v1/services/hello/weights", json={"weights": {"stable": 100}})
    assert r.status_code == 200
    r = await client.put(
        "/v1/services/hello/weights",
        json={"weights": {"stable": 100}, "sticky_header": "bad header"},
    )
    assert r.status_code == 422
    assert (await client.get("/v1/services/hello")).json()["sticky"]["header"] is None
    assert a.routes["hello"].proxy.weights == {"stable": 100}
