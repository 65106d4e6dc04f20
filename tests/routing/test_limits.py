"""The router's limits (routing/limits.py, enforced by routing/client.py): timeouts for the
request head, keep-alive, an idle body and the upstream's answer; connection caps per service and
per process; the descriptor limit.

Socket tests run real routers with timeouts of a fraction of a second and only assert what
happened eventually (answered 408, closed), never how fast. The sweep's bookkeeping (which clock
runs when) is checked tick by tick on a fake loop, without wall time.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from shipyard.routing.client import Client
from shipyard.routing.limits import ConnectionBudget, RouterLimits
from tests.routing import fakes
from tests.routing.conftest import WAIT, MakeClient, MakeProxy, MakeUpstream, RawClient

SHORT = 0.3  # seconds: every timeout under test; nothing asserts how long anything took


def short(**overrides: float | int) -> RouterLimits:
    return RouterLimits(
        head_timeout=SHORT, keepalive_timeout=SHORT, body_timeout=SHORT, response_timeout=SHORT
    ).with_overrides(dict(overrides))


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Wait for a condition of the router's (its counters) with a deadline."""
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {WAIT:g}s")
        await asyncio.sleep(0.01)


async def read_all(client: RawClient) -> bytes:
    """Everything the router sends until it closes the connection."""
    async with asyncio.timeout(WAIT):
        try:
            return await client.reader.read()
        except ConnectionError:
            return b""


# -- timeouts over real sockets ---------------------------------------------------------------


async def test_a_head_trickling_in_slowly_gets_408_and_is_closed(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    """Slowloris: a byte now and then does not keep a head alive (the clock is not reset)."""
    app = await upstreams("app")
    proxy, port = await proxies(limits=short())
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)
    await client.send(b"GET / HTTP/1.1\r\nhost: t\r\n")

    async def trickle() -> None:
        while True:
            await asyncio.sleep(SHORT / 6)
            client.writer.write(b"x")
            await client.writer.drain()

    dripping = asyncio.create_task(trickle())
    try:
        answer = await read_all(client)
    finally:
        dripping.cancel()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"connection: close\r\n" in answer
    assert app.requests == 0
    assert proxy.connection_stats()["slow_clients"] == 1


async def test_an_idle_keepalive_connection_is_closed_silently(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies(limits=short())
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)
    assert (await client.request()).status == 200
    assert await read_all(client) == b""  # closed, with no answer to a request never sent
    assert proxy.connection_stats()["idle_closed"] == 1


async def test_a_connection_that_never_sends_is_closed_silently(
    proxies: MakeProxy, clients: MakeClient
) -> None:
    proxy, port = await proxies(limits=short())
    client = await clients(port)
    assert await read_all(client) == b""
    assert proxy.connection_stats()["idle_closed"] == 1


@pytest.mark.parametrize("length", [10, 1_000_000], ids=["buffered", "streamed"])
async def test_a_stalled_body_gets_408_and_is_closed(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient, length: int
) -> None:
    """A small body is held by the router, a large one already streams to the app; either
    way a body that stops coming is a 408, and the app never sees a complete request."""
    app = await upstreams("app")
    proxy, port = await proxies(limits=short())
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)
    await client.send(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\nabc" % length)
    answer = await read_all(client)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert app.requests == 0
    assert proxy.connection_stats()["slow_clients"] == 1
    if length > 64 * 1024:  # routed before it stalled: counted like any answer
        metrics = proxy.metrics()["v1"]
        assert (metrics.requests, metrics.status_4xx, metrics.inflight) == (1, 1, 0)


async def test_the_response_timeout_is_per_service(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    """Two routers in one process: only the one configured with a short response timeout
    answers 504 for the same slow app."""
    slow = await upstreams("slow")
    patient, patient_port = await proxies(service="patient")
    hasty, hasty_port = await proxies(service="hasty", limits=short(keepalive_timeout=60))
    for proxy in (patient, hasty):
        proxy.configure({"v1": 100}, [slow.backend("v1")])
    waiting = await clients(patient_port)
    await waiting.send(b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n")
    await slow.wait_until(lambda: slow.slow_waiting == 1)
    assert (await (await clients(hasty_port)).request("GET", "/slow")).status == 504
    slow.gate.set()
    answer = await waiting.response()
    assert (answer.status, answer.body) == (200, b"slow")


# -- connection caps --------------------------------------------------------------------------


async def open_accepted(port: int, clients: MakeClient, n: int) -> list[RawClient]:
    """``n`` client connections the router has surely accepted (each got an answer)."""
    opened = [await clients(port) for _ in range(n)]
    for client in opened:
        assert (await client.request()).status == 200
    return opened


async def test_past_the_service_cap_a_fast_503_then_close(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies(limits=RouterLimits(max_connections=3))
    proxy.configure({"v1": 100}, [app.backend("v1")])
    held = await open_accepted(port, clients, 3)
    extra = await clients(port)
    refused = await extra.response()  # sent at once: the client need not even ask
    assert refused.status == 503
    assert refused.headers["connection"] == "close"
    assert await extra.closed_by_peer()
    assert proxy.connection_stats()["refused"] == 1
    # A request already sent when the 503 comes does not destroy the answer (lingering close).
    rude = await clients(port)
    await rude.send(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello")
    assert (await rude.response()).status == 503
    # A connection closed frees its place.
    await held[0].close()
    await until(lambda: proxy.connection_stats()["open"] < 3, "the router seeing the close")
    assert (await (await clients(port)).request()).status == 200
    assert app.requests == 4  # the refused connections reached no app


async def test_the_process_cap_is_shared_by_every_service(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    budget = ConnectionBudget(2)
    a, a_port = await proxies(service="a", budget=budget)
    b, b_port = await proxies(service="b", budget=budget)
    for proxy in (a, b):
        proxy.configure({"v1": 100}, [app.backend("v1")])
    await open_accepted(a_port, clients, 2)
    refused = await clients(b_port)
    assert (await refused.response()).status == 503
    stats = b.connection_stats()
    assert (stats["refused"], stats["refused_process_cap"], stats["process_open"]) == (1, 1, 2)


# -- the sweep, tick by tick (no wall time) ---------------------------------------------------


class _Conn:
    """One client connection on a fake loop, its limits counted in ticks."""

    def __init__(self, head: int, keepalive: int) -> None:
        ctx, self.loop, self.pool = fakes.router()
        ctx.head_ticks, ctx.keepalive_ticks = head, keepalive
        self.client = Client(ctx)
        self.out = fakes.connect(self.client)

    def answer(self) -> None:
        """The request in flight is answered, and the answer written (one loop iteration)."""
        self.pool.finish_connect()
        assert self.client.upstream is not None
        self.client.upstream.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        self.loop.run_ready()


def _router(head: int, keepalive: int) -> tuple[Client, fakes.FakeTransport, _Conn]:
    conn = _Conn(head, keepalive)
    return conn.client, conn.out, conn


def test_the_keepalive_clock_runs_between_requests_and_the_head_clock_once_one_starts() -> None:
    client, out, conn = _router(head=2, keepalive=5)
    client.data_received(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
    conn.answer()
    for _ in range(5):  # longer than a head may take: an idle keep-alive connection waits on
        client.tick()
    assert not out.closing
    client.data_received(b"GET / HT")  # the next head's first bytes: its own clock starts
    client.tick()
    client.tick()
    assert not out.eof_written
    client.tick()
    assert out.written.endswith(b"request timed out\n")
    assert_lingering_close(client, out, conn.loop)


def test_a_first_head_counts_from_the_accept() -> None:
    client, out, conn = _router(head=2, keepalive=50)
    client.tick()
    client.data_received(b"GET /")  # a late first byte does not restart the clock
    client.tick()
    assert not out.eof_written
    client.tick()
    assert b" 408 " in out.written
    assert_lingering_close(client, out, conn.loop)


def assert_lingering_close(client: Client, out: fakes.FakeTransport, loop: fakes.FakeLoop) -> None:
    """After its 408 the router shuts its write side but reads on (what the client still sends
    is dropped, so no reset destroys the 408), and closes the connection a moment later."""
    assert out.eof_written and out.reading and not out.closing
    written = out.written
    client.data_received(b"TP/1.1\r\nhost: t\r\n\r\n")  # the rest of the head, too late
    loop.run_ready()
    assert out.written == written and not out.closing
    loop.run_later()
    assert out.closing and out.written == written


def test_idle_keepalive_closes_after_its_own_limit_without_an_answer() -> None:
    client, out, conn = _router(head=2, keepalive=5)
    client.data_received(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
    conn.answer()
    answered = out.written
    for _ in range(6):
        client.tick()
    assert out.closing
    assert out.written == answered  # nothing more than the answer
    assert client.ctx.idle_closed == 1


# -- configuration and the descriptor limit ---------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"head_timeout": 0},
        {"keepalive_timeout": -1},
        {"body_timeout": float("nan")},
        {"response_timeout": float("inf")},
        {"max_connections": 0},
        {"max_connections": 2.5},
        {"head_timeout": True},
        {"head_timeout": "10"},
    ],
    ids=lambda o: ",".join(f"{k}={v!r}" for k, v in o.items()),
)
def test_bad_limits_are_refused_naming_the_field(overrides: dict[str, object]) -> None:
    [name] = overrides
    with pytest.raises(ValueError, match=name):
        RouterLimits().with_overrides(overrides)


def test_an_unknown_limit_is_refused_listing_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"header_timeout.*known: body_timeout"):
        RouterLimits().with_overrides({"header_timeout": 5})


def _run_with_nofile(soft: int, code: str) -> str:
    """Run ``code`` in a Python whose soft descriptor limit starts at ``soft``."""
    wrapper = (
        "import resource; _, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, hard)); "
        "import os, sys; os.execv(sys.executable, [sys.executable, '-c', sys.argv[1]])"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_descriptor_limit_is_raised_to_the_hard_maximum() -> None:
    out = _run_with_nofile(
        512,
        "import resource; from shipyard.routing.limits import raise_descriptor_limit as r; "
        "print(*r(), *resource.getrlimit(resource.RLIMIT_NOFILE))",
    )
    before, after, soft, hard = map(int, out.split())
    assert (before, after, soft) == (512, hard, hard)


def test_the_process_cap_fits_the_descriptor_limit() -> None:
    """Two descriptors per client connection, 256 kept back for the agent's API and files."""
    out = _run_with_nofile(
        1024,
        "from shipyard.routing.limits import ConnectionBudget as B; "
        "print(B.for_descriptors(10_000).limit, B.for_descriptors(100).limit)",
    )
    assert out.split() == ["384", "100"]
