"""Real HTTP upstreams and a raw HTTP/1.1 client for the router tests.

``Upstream`` is a small asyncio HTTP/1.1 server on port 0 that answers with its own name and can
be slow (held on an event), chunked, echoing, failing (``/status/503``) or rude (closing idle
keep-alive connections). ``RawClient`` speaks HTTP/1.1 over one connection byte for byte, so the
tests can send pipelined, chunked, malformed and HTTP/1.0 requests and check the framing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from shipyard.routing.limits import ConnectionBudget, RouterLimits
from shipyard.routing.proxy import Backend, ServiceProxy

WAIT = 15.0  # upper bound for any single wait; tests never rely on it passing time


def dead_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    head: bytes

    @property
    def revision(self) -> str | None:
        return self.headers.get("x-shipyard-revision")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers
            return bytes(body)
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"


def _parse_head(head: bytes) -> tuple[list[bytes], dict[str, str]]:
    lines = head[:-4].split(b"\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.decode().strip().lower()] = value.decode().strip()
    return lines[0].split(b" ", 2), headers


@dataclass
class Upstream:
    """An HTTP/1.1 app revision: answers ``name``; paths pick special behaviours."""

    name: str
    close_after_response: bool = False  # closes every connection after answering (unannounced)
    port: int = 0
    connections: int = 0
    open_connections: int = 0
    requests: int = 0
    bodies: list[bytes] = field(default_factory=list)
    heads: list[bytes] = field(default_factory=list)  # every request head as it arrived
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # releases /slow requests
    slow_waiting: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def backend(self, revision: str | None = None, replica: str | None = None) -> Backend:
        return Backend(replica or f"{self.name}-r", revision or self.name, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None
        handlers = [task for task in self._handlers if not task.done()]
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=WAIT)
            for task in pending:  # e.g. a /slow request whose gate never opened
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT), self.changed:
            await self.changed.wait_for(predicate)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        self.open_connections += 1
        self._writers.add(writer)
        await self._notify()
        try:
            await self._serve_requests(reader, writer)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the router went away: fine for a test app
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.close()
            self.open_connections -= 1
            await self._notify()

    async def _serve_requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            self.heads.append(head)
            (method, target, version), headers = _parse_head(head)
            if headers.get("expect") == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if target == b"/upgrade":  # switch to a raw echo protocol
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n"
                    b"upgrade: echo\r\n\r\n"
                )
                while data := await reader.read(65536):
                    writer.write(data.upper())
                return
            if headers.get("transfer-encoding", "").endswith("chunked"):
                body = await _read_chunked(reader)
            else:
                body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests += 1
            self.bodies.append(body)
            await self._notify()
            keep = version == b"HTTP/1.1" and headers.get("connection") != "close"
            keep = await self._respond(writer, method, target.decode(), body, keep)
            if not keep or self.close_after_response:
                return

    async def _respond(
        self, writer: asyncio.StreamWriter, method: bytes, target: str, body: bytes, keep: bool
    ) -> bool:
        status, payload, extra = 200, self.name.encode(), ""
        if target.startswith("/slow"):
            self.slow_waiting += 1
            await self._notify()
            await self.gate.wait()
            self.slow_waiting -= 1
        if target.startswith("/status/"):
            status = int(target.removeprefix("/status/"))
        elif target == "/echo":
            payload = body
        elif target.startswith("/big/"):
            payload = bytes(range(256)) * (int(target.removeprefix("/big/")) // 256)
        elif target in ("/chunked", "/echo-chunked"):
            parts = [self.name.encode(), b"-", b"x" * 3000, b"-end"]
            if target == "/echo-chunked":
                parts = [body[i : i + 1000] for i in range(0, len(body), 1000)] or [b""]
            writer.write(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-upstream: %s\r\n\r\n"
                % self.name.encode()
            )
            for part in parts:
                if part:
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                    await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return keep
        elif target == "/close-delimited":
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + self.name.encode() * 3)
            await writer.drain()
            return False
        if status in (204, 304):
            writer.write(b"HTTP/1.1 %d X\r\nx-upstream: %s\r\n\r\n" % (status, self.name.encode()))
            await writer.drain()
            return keep
        head = (
            f"HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: {len(payload)}"
            f"\r\nx-upstream: {self.name}\r\n{extra}"
            + ("" if keep else "connection: close\r\n")
            + "\r\n"
        ).encode()
        writer.write(head if method == b"HEAD" else head + payload)
        await writer.drain()
        return keep


class RawClient:
    """One HTTP/1.1 client connection, written byte for byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def response(self, *, head_request: bool = False) -> Response:
        async with asyncio.timeout(WAIT):
            while True:
                head = await self.reader.readuntil(b"\r\n\r\n")
                (_, status_b, *_), headers = _parse_head(head)
                status = int(status_b)
                if not 100 <= status < 200:
                    break
            if head_request or status in (204, 304):
                body = b""
            elif headers.get("transfer-encoding", "").endswith("chunked"):
                body = await _read_chunked(self.reader)
            elif "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            else:
                body = await self.reader.read()
        return Response(status, headers, body, head)

    async def request(
        self, method: str = "GET", path: str = "/", headers: str = "", body: bytes = b""
    ) -> Response:
        length = f"content-length: {len(body)}\r\n" if body else ""
        await self.send(
            f"{method} {path} HTTP/1.1\r\nhost: test\r\n{length}{headers}\r\n".encode() + body
        )
        return await self.response(head_request=method == "HEAD")

    async def closed_by_peer(self) -> bool:
        """True when the other side closed the connection (EOF or reset, nothing more to read)."""
        try:
            async with asyncio.timeout(WAIT):
                return await self.reader.read() == b""
        except ConnectionError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[..., Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def make(name: str, *, close_after_response: bool = False) -> Upstream:
        upstream = Upstream(name, close_after_response=close_after_response)
        await upstream.start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        upstream.gate.set()
        await upstream.stop()


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[..., Awaitable[tuple[ServiceProxy, int]]]]:
    started: list[ServiceProxy] = []

    async def make(
        *,
        max_body_bytes: int = 10 * 2**20,
        response_timeout: float = 60.0,
        max_idle_per_backend: int = 64,
        limits: RouterLimits | None = None,
        budget: ConnectionBudget | None = None,
        service: str = "svc",
    ) -> tuple[ServiceProxy, int]:
        proxy = ServiceProxy(
            service,
            max_body_bytes=max_body_bytes,
            response_timeout=None if limits else response_timeout,
            max_idle_per_backend=max_idle_per_backend,
            limits=limits,
            budget=budget,
        )
        port = await proxy.start()
        started.append(proxy)
        return proxy, port

    yield make
    for proxy in started:
        await proxy.close()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[int], Awaitable[RawClient]]]:
    opened: list[RawClient] = []

    async def make(port: int) -> RawClient:
        client = await RawClient.open(port)
        opened.append(client)
        return client

    yield make
    for client in opened:
        await client.close()


MakeUpstream = Callable[..., Awaitable[Upstream]]
MakeProxy = Callable[..., Awaitable[tuple[ServiceProxy, int]]]
MakeClient = Callable[[int], Awaitable[RawClient]]


async def one_app(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> tuple[Upstream, ServiceProxy, RawClient]:
    """The common setup: one upstream ``app`` as the only backend of revision ``v1`` (100%),
    a proxy in front of it and a client connected to the proxy."""
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")])
    return app, proxy, await clients(port)
