"""The client protocol (routing/client.py): requests parsed in order, routed, retried, answered.

Over real sockets against conftest.py's upstreams; ``test_client_phases_*`` drive one connection
with fake transports to check its request phases.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shipyard.routing.client import TRANSITIONS, Client, RequestPhase
from shipyard.routing.context import ProxyContext
from shipyard.routing.http1 import parse_request_head
from shipyard.routing.proxy import Backend

from . import fakes
from .conftest import WAIT, MakeClient, MakeProxy, MakeUpstream, dead_port, one_app
from .fakes import FakeTransport
from .test_http1 import ours, requests


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
    _app, _proxy, client = await one_app(upstreams, proxies, clients)

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
        b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
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
    app, _proxy, client = await one_app(upstreams, proxies, clients)
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
    _app, _proxy, client = await one_app(upstreams, proxies, clients)
    await client.send(b"GET / HTTP/1.0\r\n\r\n")
    response = await client.response()
    assert (response.status, response.body, response.revision) == (200, b"app", "v1")
    assert await client.closed_by_peer()


async def test_client_connection_close_is_honoured(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    _app, _proxy, client = await one_app(upstreams, proxies, clients)
    response = await client.request(headers="connection: close\r\n")
    assert response.status == 200
    assert await client.closed_by_peer()


async def test_client_reset_mid_request_is_counted_and_releases_the_revision(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app, proxy, client = await one_app(upstreams, proxies, clients)
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
    app, proxy, client = await one_app(upstreams, proxies, clients)
    await client.send(b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n")
    client.writer.write_eof()
    await app.wait_until(lambda: app.slow_waiting == 1)
    assert proxy.inflight("v1") == 1  # the app is still working on it: not drained
    app.gate.set()
    assert (await client.response()).body == b"app"
    assert await client.closed_by_peer()
    assert await proxy.drain("v1", timeout=WAIT)


# -- one connection by hand (tests/routing/fakes.py) ----------------------------------------------


def _fake(transport: asyncio.BaseTransport) -> FakeTransport:
    return cast(FakeTransport, transport)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=requests())
def test_the_connection_forwards_exactly_what_the_parser_frames(stream: bytes) -> None:
    """The client inlines the head cache and frames bodies itself: it must forward exactly the
    request test_http1.py's decision (held against llhttp) says, and refuse what it refuses."""
    ctx, loop, pool = fakes.router()
    pool.add_idle(ctx, 1)
    client = Client(ctx)
    out = fakes.connect(client)
    client.data_received(stream)
    while pool.connecting:  # a first request gets a connection of its own (http-reuse safe)
        pool.finish_connect()
    loop.run_ready()
    verdict = ours(stream)
    forwarded = b"".join(_fake(up.transport).written for up in pool.opened)
    message = stream.lstrip(b"\r\n")
    if verdict.outcome == "accept":
        assert verdict.end is not None
        skip = len(stream) - len(message)
        assert forwarded == _as_forwarded(ctx, message[: verdict.end - skip])
        assert out.writes == []
    elif verdict.outcome == "reject":
        assert forwarded == b""
        assert out.written.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 405 ", b"HTTP/1.1 413 "))
        assert out.closing
    else:
        # (a streamed request may have begun)
        assert _as_forwarded(ctx, message).startswith(forwarded)
        assert out.writes == []


def _as_forwarded(ctx: ProxyContext, message: bytes) -> bytes:
    """``message`` as the router sends it upstream: the head rewritten by http1 (hop-by-hop
    fields dropped, origin form, the Forwarding tail for a client of unknown address), the body
    byte for byte. Empty while the head is incomplete."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return b""
    *_, forward, prior = parse_request_head(message[: end + 4])
    return forward + ctx.forwarding.tail(b"unknown", prior) + message[end + 4 :]


_PHASE = Client.__dict__["phase"]  # the slot behind Client.phase


class TracingClient(Client):
    """A Client that records every change of its request phase."""

    __slots__ = ("steps",)

    def __init__(self, ctx: ProxyContext) -> None:
        self.steps: list[tuple[RequestPhase, RequestPhase]] = []
        super().__init__(ctx)

    @property
    def phase(self) -> RequestPhase:
        return cast(RequestPhase, _PHASE.__get__(self, Client))

    @phase.setter
    def phase(self, new: RequestPhase) -> None:
        try:
            old = _PHASE.__get__(self, Client)
        except AttributeError:  # the first one, in __init__
            old = None
        if old is not None and old is not new:
            self.steps.append((old, new))
        _PHASE.__set__(self, new)


_CLIENT_SENDS = {
    "get": b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
    "head": b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n",
    "post": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    "post-head-only": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n",
    "chunked": (
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "chunked-head-only": b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
    "chunk": b"5\r\nhello\r\n",
    "big-chunk": b"%x\r\n%s\r\n" % (70000, b"x" * 70000),  # outgrows the buffer: streamed
    "last-chunk": b"0\r\n\r\n",
    "expect": b"PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    "body": b"hello",
    "big": b"PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 70000\r\n\r\n" + b"x" * 1000,
    "more": b"x" * 30000,
    "close": b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    "http10": b"GET / HTTP/1.0\r\n\r\n",
    "upgrade": b"GET / HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
    "malformed": b"GARBAGE\r\n\r\n",
    "crlf": b"\r\n",
    "half-head": b"GET / HTTP/1.1\r\nHo",
    "rest-of-head": b"st: t\r\n\r\n",
}
_UPSTREAM_SENDS = {
    "200": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "200-close": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "100": b"HTTP/1.1 100 Continue\r\n\r\n",
    "101": b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
    "until-close": b"HTTP/1.1 200 OK\r\n\r\nsome",
    "head-only": b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n",
    "rest": b"abcd",
    "half-head": b"HTTP/1.1 200 OK\r\nConte",
    "garbage": b"NOT HTTP\r\n\r\n",
}


class ClientPhases(RuleBasedStateMachine):
    """One client connection, its upstreams and the loop, doing what asyncio allows in any order.

    Whatever happens, the request phase only takes the steps RequestPhase draws (checked after
    every step), and once the client is gone nothing stays counted in flight.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ctx, self.loop, self.pool = fakes.router()
        # Every sweep tick is a timeout (head, keep-alive, body and response alike).
        ctx = self.ctx
        ctx.head_ticks = ctx.keepalive_ticks = ctx.body_ticks = ctx.response_ticks = 0
        self.pool.add_idle(self.ctx, 1)
        self.client = TracingClient(self.ctx)
        self.out = fakes.connect(self.client)

    def _deliver_losses(self) -> None:
        for up in self.pool.opened:
            _fake(up.transport).deliver_loss()
        self.out.deliver_loss()

    def _reading(self) -> bool:
        return not self.out.closing and not self.client.eof

    def _upstream_open(self) -> bool:
        up = self.client.upstream
        return up is not None and not _fake(up.transport).closing

    @precondition(_reading)
    @rule(sends=st.sampled_from(sorted(_CLIENT_SENDS)), cut=st.integers(0, 40))
    def client_sends(self, sends: str, cut: int) -> None:
        data = _CLIENT_SENDS[sends]
        for piece in (data[:cut], data[cut:]):
            if piece and not self.out.closing:
                self.client.data_received(piece)

    @precondition(_upstream_open)
    @rule(answers=st.sampled_from(sorted(_UPSTREAM_SENDS)))
    def upstream_sends(self, answers: str) -> None:
        assert self.client.upstream is not None
        self.client.upstream.data_received(_UPSTREAM_SENDS[answers])

    @precondition(_upstream_open)
    @rule()
    def upstream_hangs_up(self) -> None:
        assert self.client.upstream is not None
        _fake(self.client.upstream.transport).abort()
        self._deliver_losses()

    @precondition(lambda self: bool(self.pool.connecting))
    @rule(ok=st.booleans())
    def connect_finishes(self, ok: bool) -> None:
        self.pool.finish_connect(ok)

    @rule()
    def loop_iteration(self) -> None:
        self.loop.run_ready()
        self._deliver_losses()

    @precondition(_reading)
    @rule()
    def client_half_closes(self) -> None:
        if not self.client.eof_received():
            self.out.close()  # asyncio closes the transport when eof_received says so

    @precondition(lambda self: not self.out.lost)
    @rule()
    def client_resets(self) -> None:
        self.out.abort()
        self._deliver_losses()

    @precondition(lambda self: not self.out.closing)
    @rule(slow=st.booleans())
    def client_reads(self, slow: bool) -> None:
        if slow:
            self.client.pause_writing()
        else:
            self.client.resume_writing()

    @rule()
    def timeout_tick(self) -> None:
        self.client.tick()

    @invariant()
    def phases_follow_the_transitions(self) -> None:
        for old, new in self.client.steps:
            assert new in TRANSITIONS[old], f"{old} -> {new}"

    def teardown(self) -> None:
        self.out.abort()  # the client goes away at the end
        while self.pool.connecting:
            self.pool.finish_connect()
        self.loop.run_ready()
        self._deliver_losses()
        assert self.client.phase is RequestPhase.CLOSED
        assert self.ctx.clients == set()
        assert self.ctx.table.routes[0].counters.inflight == 0


ClientPhases.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_client_phases_follow_the_transitions_whatever_happens = ClientPhases.TestCase


IDLE, BUFFERING, STREAMING, AWAITING, TUNNEL, CLOSED = (
    RequestPhase.IDLE,
    RequestPhase.BUFFERING_BODY,
    RequestPhase.STREAMING_BODY,
    RequestPhase.AWAITING_RESPONSE,
    RequestPhase.TUNNEL,
    RequestPhase.CLOSED,
)
#: name -> (steps: client sends / upstream sends / client resets / client half-closes, phases)
SCENARIOS: dict[str, tuple[list[tuple[str, str]], list[RequestPhase]]] = {
    "get-answered": ([("client", "get"), ("upstream", "200")], [IDLE, AWAITING, IDLE]),
    "body-in-two-reads": (
        [("client", "post-head-only"), ("client", "body"), ("upstream", "200")],
        [IDLE, BUFFERING, AWAITING, IDLE],
    ),
    "chunked-body-outgrows-the-buffer": (
        [
            ("client", "chunked-head-only"),
            ("client", "big-chunk"),
            ("client", "last-chunk"),
            ("upstream", "200"),
        ],
        [IDLE, BUFFERING, STREAMING, AWAITING, IDLE],
    ),
    "expect-100-continue": (
        [("client", "expect"), ("upstream", "100"), ("client", "body"), ("upstream", "200")],
        [IDLE, STREAMING, AWAITING, IDLE],
    ),
    "upgraded": (
        [("client", "upgrade"), ("upstream", "101"), ("reset", "")],
        [IDLE, AWAITING, TUNNEL, CLOSED],
    ),
    "switched-mid-body": (
        [("client", "expect"), ("upstream", "101"), ("reset", "")],
        [IDLE, STREAMING, TUNNEL, CLOSED],
    ),
    "answered-before-the-body-ended": (
        [("client", "big"), ("upstream", "200")],
        [IDLE, STREAMING, CLOSED],
    ),
    "malformed": ([("client", "malformed")], [IDLE, CLOSED]),
    "reset-while-buffering": (
        [("client", "post-head-only"), ("reset", "")],
        [IDLE, BUFFERING, CLOSED],
    ),
    "connection-close": ([("client", "close"), ("upstream", "200")], [IDLE, AWAITING, CLOSED]),
    "http10-half-closed": (
        [("client", "http10"), ("half-close", ""), ("upstream", "200")],
        [IDLE, AWAITING, CLOSED],
    ),
}


def _walk(steps: list[tuple[str, str]]) -> list[RequestPhase]:
    machine = ClientPhases()
    for who, what in steps:
        if who == "client":
            machine.client_sends(what, 0)
        elif who == "upstream":
            while machine.pool.connecting:  # a first request has a connection of its own opened
                machine.pool.finish_connect()
            machine.upstream_sends(what)
        elif who == "reset":
            machine.client_resets()
        else:
            machine.client_half_closes()
        machine.loop_iteration()
    steps_taken = machine.client.steps
    return [RequestPhase.IDLE] + [new for _, new in steps_taken]


@pytest.mark.parametrize("name", SCENARIOS)
def test_client_phase_scenarios(name: str) -> None:
    steps, phases = SCENARIOS[name]
    assert _walk(steps) == phases


def test_the_scenarios_take_every_allowed_step() -> None:
    taken = {(a, b) for _, phases in SCENARIOS.values() for a, b in itertools.pairwise(phases)}
    assert taken == {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
