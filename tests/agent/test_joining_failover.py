"""``agent.joining``'s several ``--join`` URLs: ``FailoverTransport`` sends a request to the next
fleet listener only when the current one cannot be connected to, and sticks to the one that
answered; ``join.json`` keeps the list and reads the single URL an older agent stored.

The listeners are tiny loopback HTTP servers (the transport's TLS is the ``ssl.SSLContext`` it is
given, unused for http:// URLs); the real mTLS path runs in tests/fleet/test_replicas.py."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from shipyard.agent import joining
from shipyard.errors import InvalidInput
from tests.e2e.support import free_port


class Listener:
    """An HTTP server answering every request with its own name and counting them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hosts: list[str] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        host = next(
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"host:")
        )
        self.hosts.append(host)
        body = self.name.encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(body)
        )
        writer.write(body)
        await writer.drain()
        writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def listeners() -> AsyncIterator[tuple[Listener, Listener, str, str]]:
    a, b = Listener("a"), Listener("b")
    url_a, url_b = await a.start(), await b.start()
    yield a, b, url_a, url_b
    for listener in (a, b):
        if listener.server is not None and listener.server.is_serving():
            await listener.stop()


def _client(urls: list[str], first: str | None = None) -> httpx.AsyncClient:
    transport = joining.FailoverTransport(urls, ssl.create_default_context(), first=first)
    return httpx.AsyncClient(transport=transport, base_url=urls[0], timeout=5)


async def test_goes_to_the_next_url_only_when_nothing_connects_and_stays_there(
    listeners: tuple[Listener, Listener, str, str],
) -> None:
    a, b, url_a, url_b = listeners
    dead = f"http://127.0.0.1:{free_port()}"
    async with _client([dead, url_a, url_b]) as http:
        assert (await http.get("/x")).text == "a"
        assert a.hosts == [url_a.removeprefix("http://")]  # the Host header follows the URL
        await a.stop()
        assert (await http.get("/x")).text == "b"
        assert (await http.get("/x")).text == "b"  # sticks to the one that answered
        assert b.hosts == [url_b.removeprefix("http://")] * 2
        assert http._transport.current == url_b  # type: ignore[attr-defined]
        await b.stop()
        with pytest.raises(httpx.ConnectError, match="no fleet listener"):
            await http.get("/x")


async def test_starts_with_the_url_that_answered_last(
    listeners: tuple[Listener, Listener, str, str],
) -> None:
    a, b, url_a, url_b = listeners
    async with _client([url_a, url_b], first=url_b) as http:
        assert (await http.get("/x")).text == "b"
    assert a.hosts == [] and len(b.hosts) == 1


async def test_a_get_moves_on_when_no_answer_comes_a_post_does_not(
    listeners: tuple[Listener, Listener, str, str],
) -> None:
    """A listener that takes the connection and closes it unanswered (a replica gone while a
    kept-alive connection looked open): the GET is sent to the next one, the POST is not."""
    a, _b, url_a, _url_b = listeners

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    mute = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    url_mute = f"http://127.0.0.1:{mute.sockets[0].getsockname()[1]}"
    try:
        async with _client([url_mute, url_a]) as http:
            assert (await http.get("/x")).text == "a"
        async with _client([url_mute, url_a]) as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.post("/x", json={})
        assert len(a.hosts) == 1  # the GET only
    finally:
        mute.close()
        await mute.wait_closed()


def test_membership_keeps_every_url_and_reads_an_older_single_one(tmp_path: Path) -> None:
    member = joining.Membership(
        tmp_path, ("https://a:1", "https://b:2"), "eu", "127.0.0.2", 7000, None
    )
    member.save()
    doc = json.loads((tmp_path / joining.JOIN_JSON).read_text())
    assert doc["control_plane"] == "https://a:1"
    assert joining.Membership.load(tmp_path) == member
    del doc["control_planes"]  # as the release before wrote it
    (tmp_path / joining.JOIN_JSON).write_text(json.dumps(doc))
    loaded = joining.Membership.load(tmp_path)
    assert loaded is not None and loaded.control_planes == ("https://a:1",)


def test_join_urls_are_checked(tmp_path: Path) -> None:
    assert joining.check_urls(["https://a:1/", "https://a:1", "https://b:2"]) == (
        "https://a:1",
        "https://b:2",
    )
    with pytest.raises(InvalidInput, match="https://"):
        joining.check_urls(["https://a:1", "http://b:2"])
    with pytest.raises(InvalidInput, match="cannot reach the control plane at any --join URL"):
        joining.join(
            tmp_path / "agent",
            [f"https://127.0.0.1:{free_port()}", f"https://127.0.0.1:{free_port()}"],
            "syj1." + "0" * 16 + "." + "s" * 20 + "." + "f" * 64,
            "127.0.0.1",
            7000,
            None,
        )
    assert not (tmp_path / "agent").exists()  # nothing stored
