"""The agent's shared entry point: two real services (the hello example, sandboxed replicas)
behind one shared HTTP and one HTTPS listener of a real agent, configured the way the control
plane does it (``RevisionSpec.entry`` on ``PUT .../revisions/R``): routing by host, SNI with the
test CA's certificates, redirect and HSTS, 404 for an unknown host, a host or port conflict
refused with nothing changed, a chosen port, and the hosts restored by a restarted agent."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard.agent.server import ENTRY_FILE, Agent, remembered_entry
from shipyard.runtime.base import RevisionSpec
from tests.agent.helpers import running_agent, sign
from tests.routing.certs import TestCA, presented_serial
from tests.routing.conftest import RawClient

LOOPBACK = ("127.0.0.1", 0)


def artifact(tmp: Path, version: str) -> Path:
    d = tmp / version
    d.mkdir()
    src = resources.files("shipyard.examples") / "hello"
    (d / "app.py").write_text((src / "app.py").read_text())
    (d / "version.txt").write_text(version + "\n")
    return d


def spec(tmp: Path, service: str, revision: str, entry: dict[str, Any]) -> dict[str, Any]:
    return sign(
        RevisionSpec.from_dict(
            {
                "service": service,
                "revision": revision,
                "artifact_digest": "sha256:" + "0" * 64,
                "artifact_location": str(artifact(tmp, revision)),
                "argv": ["python3", "app.py"],
                # x-shipyard-revision on: the tests tell the app's answers from the router's.
                "entry": {"revision_header": True, **entry},
            }
        )
    ).to_dict()


async def start(
    client: httpx.AsyncClient, tmp: Path, service: str, revision: str, **entry: Any
) -> None:
    """Start ``revision`` of ``service`` with ``entry`` and route all of it, as a deployment
    does (health first, then routable, then 100%)."""
    r = await client.put(
        f"/v1/services/{service}/revisions/{revision}", json=spec(tmp, service, revision, entry)
    )
    assert r.status_code == 200, r.text
    replicas = r.json()["replicas"]
    for port in (x["port"] for x in replicas):
        await healthy(port)
    ids = [x["replica_id"] for x in replicas]
    r = await client.post(
        f"/v1/services/{service}/routable", json={"replica_ids": ids, "routable": True}
    )
    assert r.status_code == 200, r.text
    r = await client.put(f"/v1/services/{service}/weights", json={"weights": {revision: 100}})
    assert r.status_code == 200, r.text


async def healthy(port: int) -> None:
    async with httpx.AsyncClient(timeout=5) as c, asyncio.timeout(30):
        while True:
            try:
                if (await c.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                    return
            except httpx.TransportError:
                await asyncio.sleep(0.05)


async def get(port: int, host: str, path: str = "/", *, tls: TestCA | None = None) -> RawClient:
    """A client that sent ``GET path`` for ``host`` (over TLS with SNI ``host`` when ``tls``)."""
    if tls is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    else:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls.client_context(), server_hostname=host
        )
    client = RawClient(reader, writer)
    await client.send(f"GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
    return client


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[tuple[Agent, httpx.AsyncClient, TestCA]]:
    ca = TestCA(tmp_path / "ca")
    certs = tmp_path / "certs"
    for name in ("notes.test", "blog.test"):
        ca.issue(certs, name)
    async with running_agent(
        tmp_path / "data", http_listen=LOOPBACK, https_listen=LOOPBACK, tls_cert_dir=certs
    ) as (agent, client):
        await agent.start_entry()
        yield agent, client, ca


async def test_two_services_share_one_http_and_one_https_listener(
    edge: tuple[Agent, httpx.AsyncClient, TestCA], tmp_path: Path
) -> None:
    agent, client, ca = edge
    await start(client, tmp_path, "notes", "n1", hosts=["notes.test"], hsts_max_age=600)
    await start(client, tmp_path, "blog", "b1", hosts=["blog.test"], https_redirect=True)
    http, https = agent.entry_ports["http"], agent.entry_ports["https"]

    c = await get(http, "notes.test")
    r = await c.response()
    assert (r.status, r.body, r.revision) == (200, b"hello from n1\n", "n1")
    assert "strict-transport-security" not in r.headers  # HSTS only over HTTPS
    await c.close()

    c = await get(http, "blog.test", "/x?y=1")
    r = await c.response()
    assert (r.status, r.headers["location"]) == (308, f"https://blog.test:{https}/x?y=1")
    await c.close()

    answers = {"notes.test": (b"hello from n1\n", "n1"), "blog.test": (b"hello from b1\n", "b1")}
    for host, (body, revision) in answers.items():
        c = await get(https, host, tls=ca)
        r = await c.response()
        assert (r.status, r.body, r.revision) == (200, body, revision)
        assert ("strict-transport-security" in r.headers) == (host == "notes.test")
        await c.close()

    c = await get(http, "nobody.test")
    r = await c.response()
    assert r.status == 404 and "x-shipyard-revision" not in r.headers
    await c.close()

    # the service's own port still serves it, as before
    state = (await client.get("/v1/services/notes")).json()
    assert state["entry"]["hosts"] == ["notes.test"]
    assert f"https://notes.test:{https}/" in state["entry"]["urls"]
    async with httpx.AsyncClient() as direct:
        assert (await direct.get(state["url"] + "/")).text == "hello from n1\n"


async def test_a_renewed_certificate_reaches_new_connections_only(
    edge: tuple[Agent, httpx.AsyncClient, TestCA], tmp_path: Path
) -> None:
    agent, client, ca = edge
    await start(client, tmp_path, "notes", "n1", hosts=["notes.test"])
    https = agent.entry_ports["https"]
    certs = agent.tls_cert_dir
    old = await get(https, "notes.test", tls=ca)
    assert (await old.response()).status == 200
    first = presented_serial(old.writer.get_extra_info("ssl_object"))
    renewed = ca.issue(certs, "notes.test")

    async def presented() -> int:
        # the agent looks at the files at most once a second: new handshakes until it has
        c = await get(https, "notes.test", tls=ca)
        assert (await c.response()).status == 200
        serial = presented_serial(c.writer.get_extra_info("ssl_object"))
        await c.close()
        return serial

    async with asyncio.timeout(30):
        while await presented() != renewed:
            await asyncio.sleep(0.1)
    await old.send(b"GET /again HTTP/1.1\r\nhost: notes.test\r\n\r\n")
    again = await old.response()
    assert again.status == 200, "the connection made before the renewal was kept"
    assert presented_serial(old.writer.get_extra_info("ssl_object")) == first
    await old.close()


async def test_a_host_another_service_claims_is_refused_and_starts_nothing(
    edge: tuple[Agent, httpx.AsyncClient, TestCA], tmp_path: Path
) -> None:
    agent, client, _ = edge
    await start(client, tmp_path, "notes", "n1", hosts=["notes.test"])
    r = await client.put(
        "/v1/services/copy/revisions/c1",
        json=spec(tmp_path, "copy", "c1", {"hosts": ["blog.test", "NOTES.test"]}),
    )
    assert r.status_code == 409
    assert "notes.test is already served by service 'notes'" in r.json()["detail"]
    assert (await client.get("/v1/services")).json() == ["notes"]
    assert not agent.supervisor.of_service("copy")
    c = await get(agent.entry_ports["http"], "notes.test")
    assert (await c.response()).body == b"hello from n1\n"
    await c.close()
    c = await get(agent.entry_ports["http"], "blog.test")
    assert (await c.response()).status == 404
    await c.close()


async def test_a_bad_host_in_the_spec_is_a_422(
    edge: tuple[Agent, httpx.AsyncClient, TestCA], tmp_path: Path
) -> None:
    _, client, _ = edge
    body = spec(tmp_path, "bad", "x1", {})
    body["entry"]["hosts"] = ["not a host"]
    r = await client.put("/v1/services/bad/revisions/x1", json=body)
    assert r.status_code == 422 and "is not a DNS name" in r.json()["detail"]
    assert (await client.get("/v1/services")).json() == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_chosen_port_and_its_conflicts(
    edge: tuple[Agent, httpx.AsyncClient, TestCA], tmp_path: Path
) -> None:
    _, client, _ = edge
    port = free_port()
    await start(client, tmp_path, "notes", "n1", port=port)
    state = (await client.get("/v1/services/notes")).json()
    assert state["url"] == f"http://127.0.0.1:{port}"

    r = await client.put(
        "/v1/services/blog/revisions/b1", json=spec(tmp_path, "blog", "b1", {"port": port})
    )
    assert r.status_code == 409
    assert f"port {port}" in r.json()["detail"] and "service 'notes'" in r.json()["detail"]

    with socket.socket() as held:  # another process's listener
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        r = await client.put(
            "/v1/services/blog/revisions/b2", json=spec(tmp_path, "blog", "b2", {"port": taken})
        )
    assert r.status_code == 409
    assert f"port {taken} asked for service 'blog'" in r.json()["detail"]
    assert (await client.get("/v1/services")).json() == ["notes"]

    # a later revision that moves the service keeps it serving on the new port
    moved = free_port()
    await start(client, tmp_path, "notes", "n2", port=moved)
    async with httpx.AsyncClient() as direct:
        assert (await direct.get(f"http://127.0.0.1:{moved}/")).status_code == 200


async def test_a_restarted_agent_serves_the_same_hosts(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    certs = tmp_path / "certs"
    ca.issue(certs, "notes.test")
    options: dict[str, Any] = {
        "http_listen": LOOPBACK,
        "https_listen": LOOPBACK,
        "tls_cert_dir": certs,
    }
    async with running_agent(tmp_path / "data", **options) as (agent, client):
        await agent.start_entry()
        await start(client, tmp_path, "notes", "n1", hosts=["notes.test"], hsts_max_age=60)
        left_behind = (agent.dir / "state.json").read_text()
    saved = json.loads(left_behind)
    assert saved["services"]["notes"]["hosts"] == ["notes.test"]
    # what an agent killed at that moment would have left (a clean close stops its replicas)
    (agent.dir / "state.json").write_text(left_behind)

    async with running_agent(tmp_path / "data", **options) as (agent, client):
        await agent.start_entry()
        await agent.restore()
        async with asyncio.timeout(30):
            while True:  # until its restored replica listens (502/503 before)
                c = await get(agent.entry_ports["https"], "notes.test", tls=ca)
                r = await c.response()
                await c.close()
                if r.status not in (502, 503):
                    break
                await asyncio.sleep(0.05)
        assert (r.status, r.body) == (200, b"hello from n1\n")
        assert r.headers["strict-transport-security"] == "max-age=60"


def test_an_agent_restarted_without_flags_opens_the_listeners_it_was_given(tmp_path: Path) -> None:
    # ``shipyard serve`` starts a crashed agent again with no listener flags: it must come back
    # with the same public listeners, and only an explicit 'off' forgets them
    d = tmp_path / "agent"  # not there yet: an agent's first start
    given = (("0.0.0.0", 80), ("0.0.0.0", 443), tmp_path / "certs")
    assert remembered_entry(d, *given, given=True) == given
    assert remembered_entry(d, None, None, None, given=False) == given
    assert (d / ENTRY_FILE).stat().st_mode & 0o077 == 0
    assert remembered_entry(d, None, None, None, given=True) == (None, None, None)
    assert remembered_entry(d, None, None, None, given=False) == (None, None, None)
    (d / ENTRY_FILE).write_text("{not json")
    assert remembered_entry(d, None, None, None, given=False) == (None, None, None)
