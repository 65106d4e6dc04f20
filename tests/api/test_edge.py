"""The API's edge under a real uvicorn (``api.edge``) and raw sockets: what a hostile client
meets before authentication — a head size and header count limit, a whole-request deadline
(slowloris, slow bodies), the keep-alive timeout, a cap on requests in flight and on
connections — and 1,100 idle sockets leave ``/healthz`` answering. Timeouts are configured
short; nothing asserts how fast, only that a connection is eventually closed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard.api import edge
from shipyard.api.app import create_app
from shipyard.api.limits import ConcurrencyLimit
from tests.api.live import LiveServer
from tests.api.test_api import Harness

#: Generous: a socket the server should close must be closed well within this.
PATIENCE = 60.0


@contextlib.contextmanager
def live(tmp_path: Path, **limits: Any) -> Iterator[int]:
    h = Harness(tmp_path)
    settings = h.settings.model_copy(update=limits)
    with LiveServer(create_app(settings, context_factory=h.context), settings) as port:
        yield port


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(PATIENCE)
    return s


def read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes (a socket timeout fails the test)."""
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            got += chunk
    return got


def healthz(port: int) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=PATIENCE)


def drip_until_closed(s: socket.socket, byte: bytes = b"a", every: float = 0.2) -> bytes:
    """Send one byte every ``every`` seconds (a slowloris client) until the server closes the
    connection; returns what it answered. Fails if it is still open after PATIENCE."""
    got = b""
    for _ in range(int(PATIENCE / every)):
        try:
            s.send(byte)
        except (BrokenPipeError, ConnectionResetError):
            return got
        readable, _, _ = select.select([s], [], [], every)
        if readable:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk
    pytest.fail(f"still open after {PATIENCE:g}s of dripping; got {got!r}")


def test_a_10_mb_header_is_refused_and_the_server_goes_on(tmp_path: Path) -> None:
    with live(tmp_path) as port:
        ok = connect(port)
        ok.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 15_000 + b"\r\n\r\n")
        assert ok.recv(65536).startswith(b"HTTP/1.1 200 "), "a head under 16 KiB is served"
        ok.close()

        s = connect(port)
        head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 10_000_000 + b"\r\n\r\n"
        try:
            s.sendall(head)
        except (BrokenPipeError, ConnectionResetError):
            answer = b"(connection reset while sending: the server stopped reading)"
        else:
            answer = read_until_closed(s)
            assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        s.close()
        assert answer, "refused, not answered"
        assert healthz(port).status_code == 200


def test_more_than_100_header_lines_get_431(tmp_path: Path) -> None:
    with live(tmp_path) as port:
        for count, status in ((100, 200), (101, 431)):
            lines = b"host: x\r\nconnection: close\r\n"
            lines += b"".join(b"x-h%d: v\r\n" % i for i in range(count - 2))
            s = connect(port)
            s.sendall(b"GET /healthz HTTP/1.1\r\n" + lines + b"\r\n")
            answer = read_until_closed(s)
            s.close()
            assert answer.startswith(b"HTTP/1.1 %d " % status), (count, answer[:200])
            if status == 431:
                body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
                assert body["error"] == "too_many_headers" and body["status"] == 431


def test_a_head_dripped_byte_by_byte_is_cut_off_with_408(tmp_path: Path) -> None:
    with live(tmp_path, request_timeout_seconds=1.0) as port:
        s = connect(port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
        answer = drip_until_closed(s)  # every byte well within any per-read timeout
        s.close()
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert healthz(port).status_code == 200


def test_a_socket_that_sends_nothing_is_closed_without_an_answer(tmp_path: Path) -> None:
    with live(tmp_path, request_timeout_seconds=0.5) as port:
        s = connect(port)
        assert read_until_closed(s) == b""
        s.close()


def test_a_body_dripped_byte_by_byte_is_cut_off(tmp_path: Path) -> None:
    with live(tmp_path, request_timeout_seconds=1.0) as port:
        s = connect(port)
        s.sendall(
            b"POST /api/v1/deploy HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 4000\r\n\r\n{"
        )
        answer = drip_until_closed(s, b" ")
        s.close()
        assert b"200 OK" not in answer and b"202 " not in answer, answer


def test_an_idle_keep_alive_connection_is_closed(tmp_path: Path) -> None:
    with live(tmp_path, keep_alive_timeout_seconds=1, request_timeout_seconds=60.0) as port:
        s = connect(port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        answer = read_until_closed(s)  # the answer, then the close after the idle pause
        s.close()
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1


def test_pipelined_requests_are_all_answered(tmp_path: Path) -> None:
    with live(tmp_path, keep_alive_timeout_seconds=1) as port:
        s = connect(port)
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n" * 3)
        answer = read_until_closed(s)
        s.close()
        assert answer.count(b"HTTP/1.1 200 ") == 3, answer


def test_a_request_in_flight_past_the_cap_gets_503(tmp_path: Path) -> None:
    with live(tmp_path, max_concurrent_requests=1, request_timeout_seconds=2.0) as port:
        slow = connect(port)  # in flight: its body never comes, until the deadline cuts it
        slow.sendall(b"POST /api/v1/deploy HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        busy = healthz(port)
        assert busy.status_code == 503, busy.text
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"] == "too_many_requests_in_flight"
        read_until_closed(slow)
        slow.close()
        assert healthz(port).status_code == 200


async def test_the_concurrency_cap_counts_requests_and_frees_its_slot() -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        entered.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    app = ConcurrencyLimit(slow_app, max_requests=2)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as c:
        first = asyncio.create_task(c.get("http://t/"))
        await entered.wait()
        entered.clear()
        second = asyncio.create_task(c.get("http://t/"))
        await entered.wait()
        third = await c.get("http://t/")
        assert third.status_code == 503
        release.set()
        assert [(await t).status_code for t in (first, second)] == [200, 200]
        assert (await c.get("http://t/")).status_code == 200
    assert app.in_flight == 0


def test_connections_past_the_cap_are_closed_at_once(tmp_path: Path) -> None:
    with live(tmp_path, max_connections=3, request_timeout_seconds=60.0) as port:
        held = [connect(port) for _ in range(3)]
        extra = connect(port)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert read_until_closed(extra) == b""
        extra.close()
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        assert held[0].recv(65536).startswith(b"HTTP/1.1 200 ")
        for s in held:
            s.close()


def test_1100_idle_sockets_leave_healthz_answering(tmp_path: Path) -> None:
    edge.raise_descriptor_limit()  # this process holds both ends: 2,200 descriptors
    with live(tmp_path, request_timeout_seconds=120.0) as port:
        idle = [connect(port) for _ in range(1100)]
        try:
            r = healthz(port)
            assert r.status_code == 200 and r.json()["status"] == "ok"
        finally:
            for s in idle:
                s.close()


def test_the_descriptor_limit_is_raised_to_the_hard_maximum() -> None:
    import resource

    limit = edge.raise_descriptor_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert limit == soft
    if hard != resource.RLIM_INFINITY:
        assert soft == hard


@pytest.mark.parametrize(
    ("configured", "descriptors", "cap"),
    [(4096, 20000, 4096), (4096, 1024, 1024 - edge.DESCRIPTOR_RESERVE), (10, 100, 1)],
    ids=["configured", "below-descriptors", "at-least-one"],
)
def test_connection_cap_leaves_descriptors_free(
    tmp_path: Path, configured: int, descriptors: int, cap: int
) -> None:
    settings = Harness(tmp_path).settings.model_copy(update={"max_connections": configured})
    assert edge.connection_cap(settings, descriptors) == cap
