"""The traffic router against real upstream servers, over real sockets (see conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.routing import metrics as routing_metrics
from shipyard.routing.proxy import Backend, ServiceProxy

from .conftest import WAIT, RawClient, Upstream

MakeUpstream = Callable[..., Awaitable[Upstream]]
MakeProxy = Callable[..., Awaitable[tuple[ServiceProxy, int]]]
MakeClient = Callable[[int], Awaitable[RawClient]]


def dead_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- weighted routing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [
        {"a": 100},
        {"a": 50, "b": 50},
        {"a": 50, "b": 30, "c": 20},
        {"a": 1, "b": 99},
        {"a": 33, "b": 33, "c": 34},
        {"a": 10, "b": 0, "c": 90},
    ],
    ids=lambda w: "-".join(f"{k}{v}" for k, v in w.items()),
)
async def test_weights_are_exact_over_100_requests(
    weights: dict[str, int], upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    apps = {name: await upstreams(name) for name in weights}
    proxy, port = await proxies()
    proxy.configure(weights, [app.backend() for app in apps.values()])
    client = await clients(port)
    seen: Counter[str] = Counter()
    for _ in range(100):
        response = await client.request()
        assert response.status == 200
        assert response.revision == response.body.decode()  # header names who answered
        seen[response.body.decode()] += 1
    assert seen == Counter({rev: w for rev, w in weights.items() if w})
    assert proxy.weights == weights


async def test_round_robin_within_a_revision(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    replicas = [await upstreams(f"r{i}") for i in range(3)]
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [r.backend("v1", r.name) for r in replicas])
    client = await clients(port)
    bodies = Counter([(await client.request()).body.decode() for _ in range(30)])
    assert bodies == Counter({"r0": 10, "r1": 10, "r2": 10})


async def test_revision_without_backends_gives_its_share_away(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    a, b = await upstreams("a"), await upstreams("b")
    proxy, port = await proxies()
    proxy.configure({"a": 50, "b": 30, "c": 20}, [a.backend(), b.backend()])
    # 50:30 of the 80 that can be served, rounded to whole percent (largest remainder)
    assert proxy.weights == {"a": 63, "b": 37, "c": 0}
    client = await clients(port)
    seen = Counter([(await client.request()).body.decode() for _ in range(100)])
    assert seen == Counter({"a": 63, "b": 37})


@pytest.mark.parametrize(
    "weights",
    [
        {"a": 50, "b": 40},
        {"a": 101},
        {"a": -10, "b": 110},
        {"a": True},
        {"a": 50.0, "b": 50},
        {"": 100},
        {"bad name": 100},
    ],
    ids=["sum-90", "over-100", "negative", "bool", "float", "empty-name", "space-in-name"],
)
async def test_bad_weights_are_refused_and_keep_the_old_table(
    weights: dict[str, int], upstreams: MakeUpstream, proxies: MakeProxy
) -> None:
    a = await upstreams("a")
    proxy, _ = await proxies()
    proxy.configure({"a": 100}, [a.backend()])
    with pytest.raises(ValueError, match=r"weight|revision"):
        proxy.configure(weights, [a.backend()])
    assert proxy.weights == {"a": 100}


# -- no traffic, failures, retries ---------------------------------------------------------------


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


# -- zero downtime -------------------------------------------------------------------------------


async def test_switch_under_concurrent_load_has_zero_errors_and_old_backend_can_stop(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    old, new = await upstreams("old"), await upstreams("new")
    proxy, port = await proxies()
    proxy.configure({"old": 100}, [old.backend()])
    switched = asyncio.Event()
    stop = asyncio.Event()
    done = Counter[str]()
    progress = asyncio.Condition()
    failures: list[str] = []
    after_switch: Counter[str] = Counter()

    async def worker(n: int) -> None:
        client = await clients(port)
        i = 0
        while not stop.is_set():
            sent_after_switch = switched.is_set()
            if i % 3 == 0:
                response = await client.request("POST", "/echo", body=b"%d" % i)
                ok = response.body == b"%d" % i
            else:
                response = await client.request()
                ok = response.body.decode() == response.revision
            if response.status != 200 or not ok:
                failures.append(f"worker {n}: {response.status} {response.body[:80]!r}")
            if sent_after_switch:
                after_switch[response.revision or "?"] += 1
            async with progress:
                done[response.revision or "?"] += 1
                progress.notify_all()
            i += 1

    async def served(predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT), progress:
            await progress.wait_for(predicate)

    workers = [asyncio.create_task(worker(n)) for n in range(16)]
    try:
        await served(lambda: done["old"] >= 300)
        proxy.configure({"old": 50, "new": 50}, [old.backend(), new.backend()])
        await served(lambda: done["new"] >= 300)
        proxy.configure({"new": 100}, [new.backend()])
        switched.set()
        assert await proxy.drain("old", timeout=WAIT)
        assert proxy.inflight("old") == 0
        await old.stop()  # stopping the old revision must not be visible to anyone
        base = done["new"]
        await served(lambda: done["new"] >= base + 500)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert failures == []
    assert set(after_switch) == {"new"}
    metrics = proxy.metrics()
    assert metrics["old"].status_5xx == metrics["new"].status_5xx == 0
    assert metrics["old"].requests == done["old"]
    # old's pooled connections were closed when it left the table
    await old.wait_until(lambda: old.open_connections == 0)


async def test_slow_request_on_old_revision_finishes_after_the_switch(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    old, new = await upstreams("old"), await upstreams("new")
    proxy, port = await proxies()
    proxy.configure({"old": 100}, [old.backend()])
    slow_client = await clients(port)
    await slow_client.send(b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n")
    await old.wait_until(lambda: old.slow_waiting == 1)
    assert proxy.inflight("old") == 1

    proxy.configure({"new": 100}, [new.backend()])
    assert proxy.weights == {"new": 100}
    assert not await proxy.drain("old", timeout=0.05)  # held by the slow request
    other = await clients(port)
    for _ in range(5):
        assert (await other.request()).revision == "new"
    assert proxy.inflight("old") == 1

    old.gate.set()
    response = await slow_client.response()
    assert (response.status, response.body, response.revision) == (200, b"old", "old")
    assert await proxy.drain("old", timeout=WAIT)
    assert proxy.inflight("old") == 0
    assert (await slow_client.request()).revision == "new"  # same connection, new table
    await old.wait_until(lambda: old.open_connections == 0)  # its connection was not pooled


async def test_drain_of_unknown_or_idle_revision_returns_at_once(proxies: MakeProxy) -> None:
    proxy, _ = await proxies()
    assert await proxy.drain("never-seen", timeout=0)
    assert proxy.inflight() == 0


# -- bodies and framing --------------------------------------------------------------------------


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


async def test_head_204_304_and_close_delimited_framing(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)

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
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)
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
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)
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
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)
    await client.send(b"GET /upgrade HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\n\r\n")
    async with asyncio.timeout(WAIT):
        head = await client.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"x-shipyard-revision: v1" in head
        await client.send(b"not http at all\r\n\r\n")
        assert await client.reader.readexactly(19) == b"NOT HTTP AT ALL\r\n\r\n"
    assert await proxy.drain("v1", timeout=WAIT)  # the upgrade answered the request


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


# -- connection reuse ----------------------------------------------------------------------------


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
    assert app.connections <= 10  # at most a few per concurrent request, never one per request


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


# -- sticky sessions -----------------------------------------------------------------------------


async def test_sticky_header_and_cookie_keep_a_user_on_one_revision(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    canary, stable = await upstreams("canary"), await upstreams("stable")
    proxy, port = await proxies()
    proxy.configure(
        {"canary": 30, "stable": 70},
        [canary.backend(), stable.backend()],
        sticky_header="X-User",
        sticky_cookie="uid",
    )
    client = await clients(port)
    for user in ("alice", "bob", "carol", "dave", "erin"):
        expected = proxy.sticky_revision(user)
        via_header = {
            (await client.request(headers=f"x-user: {user}\r\n")).revision for _ in range(5)
        }
        via_cookie = {
            (await client.request(headers=f"cookie: a=1; uid={user}; b=2\r\n")).revision
            for _ in range(5)
        }
        assert via_header == via_cookie == {expected}
    no_key = Counter([(await client.request()).revision for _ in range(100)])
    assert no_key == Counter({"canary": 30, "stable": 70})


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.binary(min_size=1, max_size=24), min_size=1, max_size=30),
    steps=st.lists(st.integers(min_value=0, max_value=100), min_size=2, max_size=8),
)
def test_sticky_keys_only_move_from_stable_to_canary_as_canary_grows(
    keys: list[bytes], steps: list[int]
) -> None:
    proxy = ServiceProxy("svc")
    backends = [Backend("c", "canary", "127.0.0.1", 1), Backend("s", "stable", "127.0.0.1", 2)]
    on_canary: set[bytes] = set()
    for weight in sorted(steps):
        proxy.configure(
            {"canary": weight, "stable": 100 - weight}, backends, sticky_header="x-user"
        )
        now = {key for key in keys if proxy.sticky_revision(key) == "canary"}
        assert on_canary <= now  # nobody who reached the canary is sent back
        on_canary = now
    if sorted(steps)[-1] == 100:
        assert on_canary == set(keys)


@pytest.mark.parametrize(
    "weights",
    [{"canary": 10, "stable": 90}, {"canary": 50, "stable": 50}, {"a": 20, "b": 30, "c": 50}],
    ids=["canary10", "canary50", "three-way"],
)
def test_sticky_buckets_are_cumulative_ranges_in_weights_order(weights: dict[str, int]) -> None:
    """bucket = crc32(key) % 100 (stable across restarts), ranges in the order given."""
    proxy = ServiceProxy("svc")
    backends = [Backend(rev, rev, "127.0.0.1", i + 1) for i, rev in enumerate(weights)]
    proxy.configure(weights, backends, sticky_cookie="uid")
    bounds, start = [], 0
    for revision, weight in weights.items():
        bounds.append((start, start + weight, revision))
        start += weight
    for n in range(500):
        key = f"user-{n}".encode()
        bucket = zlib.crc32(key) % 100
        expected = next(rev for lo, hi, rev in bounds if lo <= bucket < hi)
        assert proxy.sticky_revision(key) == expected


# -- metrics -------------------------------------------------------------------------------------


async def test_metrics_count_statuses_latency_and_windows(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)
    for path in ["/"] * 6 + ["/status/301", "/status/404", "/status/500", "/status/503"]:
        await client.request("GET", path)
    first = proxy.metrics()["v1"]
    assert (first.requests, first.responses) == (10, 10)
    assert (first.status_2xx, first.status_3xx, first.status_4xx, first.status_5xx) == (6, 1, 1, 2)
    assert first.upstream_errors == 0  # the app's own 5xx are not router errors
    assert first.success_rate == pytest.approx(0.8)
    assert sum(first.latency_buckets) == 10
    p99 = first.quantile(0.99)
    assert p99 is not None
    assert 0 < p99 <= routing_metrics.BUCKET_BOUNDS_MS[-2]
    assert first.inflight == 0

    for _ in range(5):
        await client.request("GET", "/status/502")
    window = proxy.metrics()["v1"].minus(first)
    assert (window.requests, window.status_5xx, window.status_2xx) == (5, 5, 0)
    assert window.success_rate == 0.0
    assert sum(window.latency_buckets) == 5
    as_dict = window.to_dict()
    assert as_dict["status_5xx"] == 5
    assert as_dict["latency_ms"]["buckets"]["+Inf"] == 0


def test_metrics_snapshot_is_a_copy() -> None:
    counters = routing_metrics.RevisionCounters("v1")
    counters.observe(200, 0.003)
    snapshot = counters.snapshot()
    counters.observe(500, 0.003)
    assert (snapshot.requests, snapshot.status_5xx) == (1, 0)
    assert counters.snapshot().status_5xx == 1


def _histogram(**counts: int) -> routing_metrics.RevisionMetrics:
    """Metrics whose histogram holds ``counts`` keyed like ``le_5=3`` (bound in ms)."""
    buckets = [0] * len(routing_metrics.BUCKET_BOUNDS_MS)
    for key, count in counts.items():
        bound = float("inf") if key == "le_inf" else float(key.removeprefix("le_"))
        buckets[routing_metrics.BUCKET_BOUNDS_MS.index(bound)] = count
    return routing_metrics.RevisionMetrics("v1", latency_buckets=tuple(buckets))


@pytest.mark.parametrize(
    ("metrics", "q", "expected"),
    [
        (_histogram(), 0.99, None),
        (_histogram(le_1=100), 0.5, 0.5),
        (_histogram(le_1=100), 1.0, 1.0),
        (_histogram(le_10=50, le_25=50), 0.5, 10.0),
        (_histogram(le_10=50, le_25=50), 0.75, 17.5),
        (_histogram(le_2=99, le_500=1), 0.99, 2.0),
        (_histogram(le_2=98, le_500=2), 0.99, 375.0),
        (_histogram(le_5=1, le_inf=99), 0.99, 10000.0),
        (_histogram(le_1=10), 0.0, 0.0),
    ],
    ids=[
        "empty",
        "median-in-first-bucket",
        "max-in-first-bucket",
        "median-at-bucket-edge",
        "interpolated",
        "p99-at-edge",
        "p99-in-slow-bucket",
        "unbounded-bucket-reports-lower-bound",
        "q0",
    ],
)
def test_quantile_from_histogram(
    metrics: routing_metrics.RevisionMetrics, q: float, expected: float | None
) -> None:
    assert metrics.quantile(q) == (pytest.approx(expected) if expected is not None else None)


def test_minus_refuses_other_revisions() -> None:
    with pytest.raises(ValueError, match="cannot subtract"):
        routing_metrics.RevisionMetrics("a").minus(routing_metrics.RevisionMetrics("b"))


# -- parsing and lifecycle -----------------------------------------------------------------------


async def test_port_in_use_is_a_clear_error(proxies: MakeProxy) -> None:
    _, port = await proxies()
    other = ServiceProxy("other")
    with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{port}.*another process"):
        await other.start("127.0.0.1", port)
    await other.close()


async def test_close_cuts_clients_and_is_idempotent(
    upstreams: MakeUpstream, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy = ServiceProxy("svc")
    port = await proxy.start()
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)
    assert (await client.request()).status == 200
    await proxy.close()
    await proxy.close()
    assert await client.closed_by_peer()
    with contextlib.suppress(ConnectionError):
        refused = await RawClient.open(port)
        assert await refused.closed_by_peer()
        await refused.close()
    await app.wait_until(lambda: app.open_connections == 0)


async def test_command_line_router_serves_and_stops_on_sigterm(upstreams: MakeUpstream) -> None:
    app = await upstreams("app")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shipyard.routing.proxy",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        f"v1=127.0.0.1:{app.port}",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(WAIT):
            line = (await proc.stdout.readline()).decode()
        assert "listening on 127.0.0.1:" in line
        client = await RawClient.open(int(line.rsplit(":", 1)[1]))
        response = await client.request()
        assert (response.status, response.body, response.revision) == (200, b"app", "v1")
        await client.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
        async with asyncio.timeout(WAIT):
            assert await proc.wait() == 0


async def test_drain_replica_waits_for_the_request_that_replica_holds(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    """One replica leaves a revision that keeps serving (a rolling update): the slow request it
    holds still finishes, and drain_replica returns only then."""
    a, b = await upstreams("a"), await upstreams("b")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [a.backend("v1", "r-a"), b.backend("v1", "r-b")])
    slow_client = await clients(port)
    await slow_client.send(b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n")
    await a.wait_until(lambda: a.slow_waiting == 1)  # round-robin sent the first one to r-a

    proxy.configure({"v1": 100}, [b.backend("v1", "r-b")])  # r-a leaves; v1 stays routed
    assert not await proxy.drain_replica("r-b", timeout=0.05)  # still routed: not drainable
    assert not await proxy.drain_replica("r-a", timeout=0.05)  # held by the slow request
    other = await clients(port)
    for _ in range(3):
        assert (await other.request()).body == b"b"
    a.gate.set()
    response = await slow_client.response()
    assert (response.status, response.body) == (200, b"a")
    assert await proxy.drain_replica("r-a", timeout=WAIT)
    assert await proxy.drain_replica("never-routed", timeout=0.05)
