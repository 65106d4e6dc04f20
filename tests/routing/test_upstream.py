"""The upstream protocol (routing/upstream.py): response framing and relaying, over real sockets."""

from __future__ import annotations

import asyncio

from .conftest import WAIT, MakeClient, MakeProxy, MakeUpstream, one_app


async def test_head_204_304_and_close_delimited_framing(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    _app, _proxy, client = await one_app(upstreams, proxies, clients)

    response = await client.request("HEAD", "/")
    assert (response.status, response.headers["content-length"], response.body) == (200, "3", b"")
    response = await client.request("GET", "/status/204")
    assert (response.status, response.revision) == (204, "v1")
    response = await client.request("GET", "/status/304")
    assert response.status == 304
    # the connection still frames correctly after body-less responses
    assert (await client.request()).body == b"app"

    response = await client.request("GET", "/close-delimited")
    assert (response.status, response.body) == (200, b"app" * 3)
    assert await client.closed_by_peer()


async def test_large_response_to_a_slow_reader_arrives_intact(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    _app, _proxy, client = await one_app(upstreams, proxies, clients)
    size = 16 * 2**20  # far more than socket buffers: the router must pause the upstream
    await client.send(b"GET /big/%d HTTP/1.1\r\nhost: t\r\n\r\n" % size)
    head = await client.reader.readuntil(b"\r\n\r\n")
    assert b"content-length: %d" % size in head
    received = bytearray()
    while len(received) < size:
        received += await client.reader.read(4096)  # small reads: a slow consumer
    assert received == bytes(range(256)) * (size // 256)
    assert (await client.request()).body == b"app"


async def test_expect_100_continue_is_relayed(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    _app, _proxy, client = await one_app(upstreams, proxies, clients)
    await client.send(
        b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
    )
    async with asyncio.timeout(WAIT):
        interim = await client.reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100 ")  # the body has not been sent yet
    await client.send(b"hello")
    response = await client.response()
    assert (response.status, response.body) == (200, b"hello")


async def test_upgrade_switches_to_a_raw_tunnel(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    _app, proxy, client = await one_app(upstreams, proxies, clients)
    await client.send(b"GET /upgrade HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\n\r\n")
    async with asyncio.timeout(WAIT):
        head = await client.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"x-shipyard-revision: v1" in head
        await client.send(b"not http at all\r\n\r\n")
        assert await client.reader.readexactly(19) == b"NOT HTTP AT ALL\r\n\r\n"
    assert await proxy.drain("v1", timeout=WAIT)  # the upgrade answered the request
