"""Upstream connection pools (routing/pool.py): reuse, caps, retirement, stale connections, and
who may reuse a pooled connection (HAProxy's ``http-reuse safe``, and never after a request whose
body the app may not have read: the CL.0 desync of issue 10, replayed against a real app that
ignores GET bodies).

The first tests go through ServiceProxy over real sockets; the last drive a Pool by hand.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from shipyard.routing.pool import DOWN_SECONDS, Pool
from shipyard.routing.table import Backend
from shipyard.routing.upstream import Upstream

from . import fakes
from .conftest import MakeClient, MakeProxy, MakeUpstream, RawClient
from .fakes import FakeTransport


async def test_backend_closing_idle_keepalive_connections_causes_no_errors(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    rude = await upstreams("rude", close_after_response=True)
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [rude.backend("v1")])

    async def worker() -> list[int]:
        client = await clients(port)
        statuses = []
        for i in range(25):
            if i % 2:
                statuses.append((await client.request("POST", "/echo", body=b"x" * i)).status)
            else:
                statuses.append((await client.request()).status)
        return statuses

    results = await asyncio.gather(*(worker() for _ in range(4)))
    assert [s for statuses in results for s in statuses] == [200] * 100
    assert proxy.metrics()["v1"].status_5xx == 0


async def test_upstream_connections_are_reused(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")])

    async def worker() -> None:
        client = await clients(port)
        for _ in range(50):
            assert (await client.request()).status == 200
        await client.close()

    for _ in range(4):  # new client connections each round, same upstream pool
        await asyncio.gather(*(worker() for _ in range(5)))
    assert app.requests == 1000
    # One per client connection, opened for its first request (http-reuse safe: a first request
    # never rides a connection another client used); the other 980 requests reuse the pool.
    assert app.connections == 20


async def test_idle_connections_per_backend_are_capped(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies(max_idle_per_backend=2)
    proxy.configure({"v1": 100}, [app.backend("v1")])
    waiting = [await clients(port) for _ in range(5)]
    for client in waiting:  # five requests in flight at once: five upstream connections
        await client.send(b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n")
    await app.wait_until(lambda: app.slow_waiting == 5)
    app.gate.set()
    for client in waiting:
        assert (await client.response()).status == 200
    await app.wait_until(lambda: app.open_connections == 2)  # the rest were closed, not pooled


async def test_removed_backend_idle_connections_are_closed(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    old, new = await upstreams("old"), await upstreams("new")
    proxy, port = await proxies()
    proxy.configure({"old": 100}, [old.backend()])
    client = await clients(port)
    assert (await client.request()).revision == "old"
    assert old.open_connections == 1
    proxy.configure({"new": 100}, [new.backend()])
    await old.wait_until(lambda: old.open_connections == 0)


# -- the Pool itself, without sockets (tests/routing/fakes.py) ------------------------------------


def _pool_with_idle(count: int, max_idle: int = 64) -> tuple[Pool, list[FakeTransport]]:
    ctx, _, _ = fakes.router()
    pool = Pool(Backend("r", "v1", "127.0.0.1", 1), max_idle)
    transports = []
    for _ in range(count):
        up = Upstream(pool, ctx.batcher)
        transports.append(fakes.connect(up))
        pool.conns += 1
        pool.idle.append(up)
    return pool, transports


def test_take_idle_gives_the_most_recent_open_connection_and_drops_closed_ones() -> None:
    pool, transports = _pool_with_idle(3)
    oldest, middle, _newest = pool.idle
    transports[2].close()  # the backend closed the most recent one meanwhile
    assert pool.take_idle() is middle
    assert pool.idle == [oldest]
    transports[0].close()
    assert pool.take_idle() is None
    assert pool.idle == []


def test_release_keeps_up_to_max_idle_and_closes_the_rest() -> None:
    pool, transports = _pool_with_idle(3, max_idle=2)
    ups = list(pool.idle)
    pool.idle.clear()
    for up in ups:
        pool.release(up)
    assert pool.idle == ups[:2]
    assert [t.closing for t in transports] == [False, False, True]
    assert all(up.reused for up in ups)


async def test_a_retired_pool_keeps_nothing_and_says_when_its_last_connection_closed() -> None:
    pool, transports = _pool_with_idle(2)
    busy = pool.idle.pop()  # in use by a request: stays open after retirement
    pool.drained = asyncio.Event()
    pool.retire()
    assert pool.idle == []
    assert transports[0].closing and not transports[1].closing
    pool.closed_one()  # the idle one's close arrives
    assert not pool.drained.is_set()
    pool.release(busy)  # its request finished: a retired pool closes it instead of keeping it
    assert transports[1].closing and pool.idle == []
    pool.closed_one()
    assert pool.drained.is_set()


def test_a_failed_connect_marks_the_backend_down_for_a_while() -> None:
    pool, _ = _pool_with_idle(0)
    before = time.monotonic()
    pool.mark_down()
    assert before + DOWN_SECONDS <= pool.down_until <= time.monotonic() + DOWN_SECONDS


# -- who may reuse a pooled connection ------------------------------------------------------------


async def test_a_first_request_never_rides_a_connection_another_client_used(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")])
    a = await clients(port)
    assert (await a.request()).status == 200
    assert app.connections == 1  # now idle in the pool
    b = await clients(port)
    assert (await b.request()).status == 200
    assert app.connections == 2  # b's first request got a connection of its own
    for client in (b, a, b):  # later requests reuse what is pooled
        assert (await client.request()).status == 200
    assert app.connections == 2


class HeadOnlyApp:
    """An app that reads request heads only: a body it was not expecting (on a GET) stays on the
    connection and is read as the start of the next request. Answers each request with its
    target, keeping the connection open."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1]
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(target), target)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def head_only_app() -> AsyncIterator[tuple[HeadOnlyApp, int]]:
    app = HeadOnlyApp()
    port = await app.start()
    yield app, port
    await app.stop()


#: The attacker's request: a GET whose body is the start of another request, left open so that
#: whatever the app reads next (the victim's request) becomes one of its header values.
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nx-ignore: "
ATTACK = b"GET /health HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n%s" % (
    len(SMUGGLED),
    SMUGGLED,
)


async def _path(client: RawClient, path: str = "/") -> bytes:
    response = await client.request("GET", path)
    assert response.status == 200
    return response.body


@pytest.mark.parametrize(
    "victim",
    ["a new client", "a client on its second request", "the attacker's next request"],
)
async def test_a_get_body_the_app_ignored_never_reaches_another_request(
    head_only_app: tuple[HeadOnlyApp, int],
    proxies: MakeProxy,
    clients: MakeClient,
    victim: str,
) -> None:
    """The CL.0 desync of issue 10: each client gets the answer to what it asked."""
    _, app_port = head_only_app
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [Backend("r1", "v1", "127.0.0.1", app_port)])
    attacker = await clients(port)
    if victim == "a client on its second request":
        target = await clients(port)
        assert await _path(target, "/warm") == b"/warm"  # its connection sits in the pool
    elif victim == "a new client":
        target = None
    else:
        target = attacker
    await attacker.send(ATTACK)
    assert (await attacker.response()).body == b"/health"
    if target is None:
        target = await clients(port)
    assert await _path(target) == b"/"
    assert await _path(target, "/again") == b"/again"


async def test_after_a_post_body_the_connection_is_reused(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    """Only bodies an app may ignore cost a connection: a POST's is read by the app."""
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)
    for _ in range(3):
        assert (await client.request("POST", "/echo", body=b"data")).body == b"data"
    assert (await client.request("GET", "/", body=b"data")).status == 200
    assert (await client.request()).status == 200
    # One connection for the POSTs; the GET with a body closed it; one more after that.
    assert app.connections == 2
