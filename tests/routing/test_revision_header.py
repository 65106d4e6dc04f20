"""``x-shipyard-revision``: the router can name the revision that answered, and does only when
the service asks (``[routing] revision_header = true``; off by default) — from the manifest
through the deployment's stored revision and the agent's route to the bytes on the wire."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import httpx
import pytest

from shipyard.build.fake import FakeBuilder
from shipyard.domain.manifest import parse_manifest
from shipyard.errors import ShipyardError
from shipyard.routing.proxy import Backend
from shipyard.runtime.base import EntrySpec, RevisionSpec
from tests.agent.helpers import eventually, running_agent, sign
from tests.orchestrator.world import PipelineWorld
from tests.routing.conftest import MakeClient, MakeProxy, MakeUpstream, dead_port

MANIFEST = """
[service]
name = "api"
[run]
command = "python3 app.py"
[health]
endpoint = "/health"
"""

# --- the router ----------------------------------------------------------------------------------


@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
@pytest.mark.parametrize("path", ["/", "/chunked", "/status/204"])
async def test_the_router_adds_the_header_only_when_asked(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient, on: bool, path: str
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")], revision_header=on)
    client = await clients(port)

    await client.send(f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    response = await client.response()

    assert response.status in (200, 204)
    assert response.headers.get("x-shipyard-revision") == ("v1" if on else None)
    assert response.head.startswith(b"HTTP/1.1 ")  # the status line is intact either way
    # The connection goes on: the next response is framed right.
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await client.response()).body == b"app"


@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
async def test_the_routers_own_answers_follow_the_same_setting(
    proxies: MakeProxy, clients: MakeClient, on: bool
) -> None:
    proxy, port = await proxies()
    proxy.configure(
        {"v1": 100}, [Backend("gone", "v1", "127.0.0.1", dead_port())], revision_header=on
    )
    client = await clients(port)
    await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    response = await client.response()
    assert response.status == 502
    assert response.headers.get("x-shipyard-revision") == ("v1" if on else None)


# --- the manifest and the spec sent to the agent --------------------------------------------------


def test_the_manifest_asks_for_it_and_is_off_by_default() -> None:
    assert parse_manifest(MANIFEST).routing.revision_header is False
    on = parse_manifest(MANIFEST + "[routing]\nrevision_header = true\n")
    assert on.routing.revision_header is True
    with pytest.raises(ShipyardError) as refused:
        parse_manifest(MANIFEST + '[routing]\nrevision_header = "yes please"\n')
    assert "revision_header" in refused.value.message


def test_the_spec_carries_it_only_when_on_so_an_older_agent_accepts_the_rest() -> None:
    base = RevisionSpec("api", "v1", "sha256:" + "0" * 64, "/a", ["app"])
    off = RevisionSpec(**{**base.__dict__, "entry": EntrySpec()}).to_dict()
    assert "revision_header" not in off["entry"]
    on = RevisionSpec(**{**base.__dict__, "entry": EntrySpec(revision_header=True)}).to_dict()
    assert on["entry"]["revision_header"] is True
    assert RevisionSpec.from_dict(on).entry == EntrySpec(revision_header=True)
    with pytest.raises(ValueError, match="revision_header must be true or false"):
        EntrySpec.from_dict({"revision_header": "true"})


@pytest.mark.parametrize("on", [True, False], ids=["on", "off"])
async def test_a_deployment_stores_the_manifests_choice_with_its_revision(
    tmp_path: Path, on: bool
) -> None:
    text = MANIFEST + ("[routing]\nrevision_header = true\n" if on else "")
    world = PipelineWorld(tmp_path, builder=FakeBuilder(manifest=parse_manifest(text)))
    await world.pipeline.start()
    try:
        doc = await world.deploy("aaaa1111", {"BlueGreen": {"switch_delay_seconds": 0}})
    finally:
        await world.pipeline.stop()
    assert doc["status"] == "Success", doc.get("error")
    entry = world.store.get_revision_spec(doc["green_revision"])["entry"]
    assert entry.get("revision_header", False) is on
    assert ("revision_header" in entry) is on  # absent when off: older readers accept it


# --- the agent -----------------------------------------------------------------------------------


async def start(client: httpx.AsyncClient, tmp: Path, revision: str, entry: object) -> None:
    d = tmp / revision
    d.mkdir()
    src = resources.files("shipyard.examples") / "hello"
    (d / "app.py").write_text((src / "app.py").read_text())
    (d / "version.txt").write_text(revision + "\n")
    doc: dict[str, object] = {
        "service": "hello",
        "revision": revision,
        "artifact_digest": "sha256:" + "0" * 64,
        "artifact_location": str(d),
        "argv": ["python3", "app.py"],
        "env": {},
        "replicas": 1,
        "health_endpoint": "/health",
    }
    if entry is not None:
        doc["entry"] = entry
    spec = sign(RevisionSpec.from_dict(doc))
    r = await client.put(f"/v1/services/hello/revisions/{revision}", json=spec.to_dict())
    assert r.status_code == 200, r.text
    ids = [x["replica_id"] for x in r.json()["replicas"]]
    r = await client.post(
        "/v1/services/hello/routable", json={"replica_ids": ids, "routable": True}
    )
    assert r.status_code == 200, r.text
    r = await client.put("/v1/services/hello/weights", json={"weights": {revision: 100}})
    assert r.status_code == 200, r.text


async def answered_by(url: str) -> str | None:
    """The header of the first 200 (the app may still be binding, or be restarting)."""

    async def answer() -> httpx.Response | None:
        async with httpx.AsyncClient(timeout=5) as c:
            try:
                r = await c.get(url)
            except httpx.TransportError:
                return None
        return r if r.status_code == 200 else None

    r = await eventually(answer, what=f"{url} answering 200")
    revision: str | None = r.headers.get("x-shipyard-revision")
    return revision


async def test_the_agent_follows_the_started_revisions_entry_and_keeps_it_across_restarts(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    async with running_agent(data) as (agent, client):
        await start(client, tmp_path, "v1", None)  # no entry at all: off
        url = agent.url(agent.routes["hello"])
        assert await answered_by(url) is None
        await start(client, tmp_path, "v2", {"revision_header": True})
        assert await answered_by(url) == "v2"
        state = (await client.get("/v1/services/hello")).json()
        assert state["entry"]["revision_header"] is True
        saved = json.loads((agent.dir / "state.json").read_text())
        assert saved["services"]["hello"]["revision_header"] is True
    # A closed agent stops its replicas; a new one over the same state keeps the setting: a
    # revision started without an entry (a spec from before entries) is served with it.
    async with running_agent(data) as (restored, client):
        await restored.restore()
        assert restored.routes["hello"].revision_header is True
        url = restored.url(restored.routes["hello"])
        (tmp_path / "again").mkdir()
        await start(client, tmp_path / "again", "v3", None)
        assert await answered_by(url) == "v3"
        await start(client, tmp_path / "again", "v4", {})  # an entry that does not ask: off
        assert await answered_by(url) is None
