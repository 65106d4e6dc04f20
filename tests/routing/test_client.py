"""The client protocol (routing/client.py): requests parsed in order, routed, retried, answered.

Over real sockets against conftest.py's upstreams; ``test_client_phases_*`` drive one connection
with fake transports to check its request phases.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from shipyard.routing.proxy import Backend

from .conftest import WAIT, MakeClient, MakeProxy, MakeUpstream, dead_port


async def test_no_backends_is_503_with_a_text_body(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    proxy, port = await proxies()
    client = await clients(port)
    response = await client.request()  # never configured
    assert response.status == 503
    assert b"no backend" in response.body
    assert response.headers["content-type"].startswith("text/plain")

    proxy.configure({"a": 100}, [])  # a revision, but nothing runs it
    assert proxy.weights == {"a": 0}
    assert (await client.request()).status == 503  # the connection stayed usable

    proxy.configure({}, [])
    assert (await client.request()).status == 503
    assert proxy.unrouted == 3


async def test_dead_backend_is_retried_on_a_live_one(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    live = await upstreams("live")
    proxy, port = await proxies()
    dead = Backend("dead-r", "v1", "127.0.0.1", dead_port())
    proxy.configure({"v1": 100}, [dead, live.backend("v1")])
    client = await clients(port)
    for _ in range(20):
        response = await client.request("POST", "/echo", body=b"payload")
        assert (response.status, response.body) == (200, b"payload")
    metrics = proxy.metrics()["v1"]
    assert metrics.retries >= 1
    assert (metrics.status_2xx, metrics.status_5xx, metrics.upstream_errors) == (20, 0, 0)
    assert live.requests == 20


async def test_a_backend_that_hangs_up_without_answering_is_left_for_a_live_one(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    """A replica being killed accepts the request and drops the connection: the request goes to
    another backend at once instead of being sent to the dying one again."""
    hangups = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal hangups
        await reader.readuntil(b"\r\n\r\n")
        hangups += 1
        writer.transport.abort()

    dying = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    live = await upstreams("live")
    proxy, port = await proxies()
    doomed = Backend("dying-r", "v1", "127.0.0.1", dying.sockets[0].getsockname()[1])
    proxy.configure({"v1": 100}, [doomed, live.backend("v1")])
    client = await clients(port)
    try:
        for _ in range(20):
            response = await client.request()
            assert (response.status, response.body) == (200, b"live")
    finally:
        dying.close()
    assert hangups >= 1
    metrics = proxy.metrics()["v1"]
    assert (metrics.status_2xx, metrics.status_5xx) == (20, 0)


async def test_dead_revision_falls_back_to_another_routed_revision(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    stable = await upstreams("stable")
    proxy, port = await proxies()
    canary = Backend("canary-r", "canary", "127.0.0.1", dead_port())
    proxy.configure({"canary": 50, "stable": 50}, [canary, stable.backend()])
    client = await clients(port)
    for _ in range(10):
        response = await client.request()
        assert (response.status, response.revision) == (200, "stable")
    assert proxy.inflight() == 0


async def test_all_backends_dead_is_502_and_counted(
    proxies: MakeProxy, clients: MakeClient
) -> None:
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [Backend("x", "v1", "127.0.0.1", dead_port())])
    client = await clients(port)
    response = await client.request()
    assert response.status == 502
    assert response.revision == "v1"
    metrics = proxy.metrics()["v1"]
    assert (metrics.status_5xx, metrics.upstream_errors, metrics.inflight) == (1, 1, 0)
    assert metrics.retries == 2  # three attempts in all


async def test_response_timeout_is_504(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    slow = await upstreams("slow")  # its gate is never opened during the request
    proxy, port = await proxies(response_timeout=0.2)
    proxy.configure({"v1": 100}, [slow.backend("v1")])
    client = await clients(port)
    response = await client.request("GET", "/slow")
    assert response.status == 504
    metrics = proxy.metrics()["v1"]
    assert (metrics.status_5xx, metrics.upstream_errors, metrics.inflight) == (1, 1, 0)
    slow.gate.set()
    assert (await client.request()).status == 200  # the client connection is still good


async def test_chunked_request_and_response_bodies(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)

    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in (b"hello ", b"chunked ", b"world"))
    await client.send(
        b"POST /echo-chunked HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
        + body
        + b"0\r\ntrailer: yes\r\n\r\n"
    )
    response = await client.response()
    assert response.status == 200
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.body == b"hello chunked world"

    response = await client.request("GET", "/chunked")
    assert response.body == b"app-" + b"x" * 3000 + b"-end"

    # a big chunked body (streamed, not buffered), sent in pieces
    big = bytes(range(256)) * 1024  # 256 KiB
    await client.send(b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
    for i in range(0, len(big), 10_000):
        piece = big[i : i + 10_000]
        await client.send(b"%x\r\n%s\r\n" % (len(piece), piece))
    await client.send(b"0\r\n\r\n")
    response = await client.response()
    assert (response.status, response.body) == (200, big)

    # and a big Content-Length body
    response = await client.request("POST", "/echo", body=big)
    assert (response.status, response.body) == (200, big)
    assert (await client.request()).body == b"app"  # framing intact afterwards


async def test_body_over_the_limit_is_413_and_closes(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies(max_body_bytes=1000)
    proxy.configure({"v1": 100}, [app.backend("v1")])

    client = await clients(port)
    await client.send(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 5000\r\n\r\n")
    assert (await client.response()).status == 413
    assert await client.closed_by_peer()

    client = await clients(port)
    await client.send(b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
    await client.send(b"3e8\r\n" + b"x" * 1000 + b"\r\n")  # exactly the limit: fine so far
    await client.send(b"1\r\nx\r\n")
    assert (await client.response()).status == 413
    assert await client.closed_by_peer()
    assert app.requests == 0

    client = await clients(port)  # at the limit is accepted
    response = await client.request("POST", "/echo", body=b"y" * 1000)
    assert (response.status, len(response.body)) == (200, 1000)


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: t\r\ncontent-length: abc\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost : t\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: t\r\n folded\r\n\r\n",
        b"GET / HTTP/2.0\r\nhost: t\r\n\r\n",
        b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=[
        "no-request-line",
        "bad-length",
        "two-lengths",
        "length-and-chunked",
        "space-before-colon",
        "obs-fold",
        "http2-version",
        "not-chunked",
        "bad-chunk-size",
    ],
)
async def test_malformed_requests_are_400_and_close(
    raw: bytes, upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)
    await client.send(raw)
    assert (await client.response()).status == 400
    assert await client.closed_by_peer()
    assert app.requests == 0


async def test_pipelined_requests_are_answered_in_order(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    a, b = await upstreams("a"), await upstreams("b")
    proxy, port = await proxies()
    proxy.configure({"a": 50, "b": 50}, [a.backend(), b.backend()])
    client = await clients(port)
    requests = [
        b"GET / HTTP/1.1\r\nhost: t\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nfirst",
        b"HEAD / HTTP/1.1\r\nhost: t\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
        b"6\r\nsecond\r\n0\r\n\r\n",
        b"GET /status/204 HTTP/1.1\r\nhost: t\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
        b"GET /never HTTP/1.1\r\nhost: t\r\n\r\n",  # after close: not answered
    ]
    await client.send(b"".join(requests))
    first = await client.response()
    assert first.body.decode() == first.revision
    assert (await client.response()).body == b"first"
    head = await client.response(head_request=True)
    assert (head.status, head.body) == (200, b"")
    assert (await client.response()).body == b"second"
    assert (await client.response()).status == 204
    last = await client.response()
    assert last.headers["connection"] == "close"
    assert await client.closed_by_peer()
    assert a.requests + b.requests == 6


async def test_http10_client_gets_its_response_and_a_close(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)
    await client.send(b"GET / HTTP/1.0\r\n\r\n")
    response = await client.response()
    assert (response.status, response.body, response.revision) == (200, b"app", "v1")
    assert await client.closed_by_peer()


async def test_client_connection_close_is_honoured(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)
    response = await client.request(headers="connection: close\r\n")
    assert response.status == 200
    assert await client.closed_by_peer()


async def test_client_reset_mid_request_is_counted_and_releases_the_revision(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)
    await client.send(b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n")
    await app.wait_until(lambda: app.slow_waiting == 1)
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.transport.abort()  # RST: the client is gone for good
    assert await proxy.drain("v1", timeout=WAIT)
    metrics = proxy.metrics()["v1"]
    assert (metrics.requests, metrics.client_aborts, metrics.responses) == (1, 1, 0)
    app.gate.set()  # the app answers into a connection the router has cut: not pooled
    await app.wait_until(lambda: app.open_connections == 0)


async def test_client_half_close_still_gets_the_response(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)
    await client.send(b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n")
    client.writer.write_eof()
    await app.wait_until(lambda: app.slow_waiting == 1)
    assert proxy.inflight("v1") == 1  # the app is still working on it: not drained
    app.gate.set()
    assert (await client.response()).body == b"app"
    assert await client.closed_by_peer()
    assert await proxy.drain("v1", timeout=WAIT)
