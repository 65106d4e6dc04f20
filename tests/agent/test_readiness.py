"""The supervisor's readiness probe (``agent.supervisor.probe_ready``) against a real listener
answering a scripted status line: only a 2xx counts, and without an endpoint an accepted
connection does."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from shipyard.agent.supervisor import probe_ready


class Scripted:
    """A TCP server that answers every request with ``answer`` and remembers what it got."""

    def __init__(self) -> None:
        self.answer = b""
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(self.answer)
        await writer.drain()
        writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, int]]:
    s = Scripted()
    server = await asyncio.start_server(s.handle, "127.0.0.1", 0)
    try:
        yield s, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("answer", "ready"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", True, id="200"),
        pytest.param(b"HTTP/1.0 204 No Content\r\n\r\n", True, id="204-http1.0"),
        pytest.param(b"HTTP/1.1 301 Moved\r\nlocation: /\r\n\r\n", False, id="redirect"),
        pytest.param(b"HTTP/1.1 503 Unavailable\r\n\r\n", False, id="503"),
        pytest.param(b"HTTP/1.1 2000 Odd\r\n\r\n", False, id="four-digits"),
        pytest.param(b"SSH-2.0-OpenSSH\r\n", False, id="not-http"),
        pytest.param(b"", False, id="closed-without-answer"),
    ],
)
async def test_only_a_2xx_answer_is_ready(
    scripted: tuple[Scripted, int], answer: bytes, ready: bool
) -> None:
    s, port = scripted
    s.answer = answer
    assert await probe_ready(port, "/health") is ready
    assert s.requests[0].startswith(b"GET /health HTTP/1.1\r\n")


async def test_an_endpoint_cannot_smuggle_a_header(scripted: tuple[Scripted, int]) -> None:
    s, port = scripted
    s.answer = b"HTTP/1.1 200 OK\r\n\r\n"
    assert await probe_ready(port, "/health\r\nx-evil: 1")
    assert s.requests[0].startswith(b"GET /health%0D%0Ax-evil:%201 HTTP/1.1\r\n")


async def test_without_an_endpoint_an_accepted_connection_is_ready(
    scripted: tuple[Scripted, int],
) -> None:
    _, port = scripted
    assert await probe_ready(port, None)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        assert not await probe_ready(unused.getsockname()[1], None)


@pytest.mark.parametrize(
    ("answer", "ready"),
    [
        pytest.param(b"HTTP/1.1 200 " + b"x" * 200_000, False, id="status-line-past-64KiB"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-length: 4194304\r\n\r\n" + b"x" * 4194304,
            True,
            id="big-body-unread",
        ),
    ],
)
async def test_only_a_bounded_status_line_is_read(
    scripted: tuple[Scripted, int], answer: bytes, ready: bool
) -> None:
    s, port = scripted
    s.answer = answer
    assert await probe_ready(port, "/health") is ready
