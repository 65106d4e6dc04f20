"""The upstream protocol: one connection to a backend, reading the response to a request.

``routing.pool`` opens these and keeps the idle ones; ``routing.client`` attaches one to a
request and writes the request through it. This side parses the response's framing (interim 1xx,
Content-Length, chunked, close-delimited, 101 tunnel), streams the bytes to the client as they
arrive with ``x-shipyard-revision`` inserted after the status line (one ``bytes.replace``), and
tells the client when the response is complete, broken or lost; then the connection goes back to
its pool or is closed.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING

from shipyard.routing.batching import BatchedConnection, WriteBatcher
from shipyard.routing.http1 import (
    MAX_HEAD,
    BadFraming,
    ChunkedScanner,
    MalformedMessage,
    parse_response_head,
    response_cache,
)

if TYPE_CHECKING:
    from shipyard.routing.client import Client
    from shipyard.routing.pool import Pool

__all__ = ["Upstream"]

# The router's log lines keep the name they had when it was one module.
log = logging.getLogger("shipyard.routing.proxy")

# upstream (response) states
R_IDLE = 0
R_HEAD = 1
R_LENGTH = 2
R_CHUNKED = 3
R_CLOSE = 4  # body delimited by the upstream closing the connection
R_TUNNEL = 5

# why reading from a client is paused (bit flags)
PAUSE_PIPELINE = 1
PAUSE_UPSTREAM = 2


class Upstream(BatchedConnection):
    """One connection to a backend; parses response framing and streams bytes to its client."""

    __slots__ = (
        "chunks",
        "client",
        "got",
        "hbuf",
        "keep",
        "left",
        "pool",
        "reused",
        "state",
        "status",
    )

    def __init__(self, pool: Pool, batcher: WriteBatcher) -> None:
        super().__init__(batcher)
        self.pool = pool
        self.client: Client | None = None
        self.state = R_IDLE
        self.reused = False
        self.got = False
        self.keep = True
        self.left = 0
        self.status = 0
        self.chunks: ChunkedScanner | None = None
        self.hbuf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        c = self.client
        if c is None:  # an idle connection must stay silent; anything else makes it unusable
            self.close_transport()
            return
        c.idle_ticks = 0
        state = self.state
        if state == R_LENGTH:
            left = self.left
            n = len(data)
            if n < left:
                self.left = left - n
                c.send(data)
                return
            if n > left:
                data = data[:left]
                self.keep = False
            self.left = 0
            c.send(data)
            self._complete(c)
        elif state == R_HEAD:
            self._on_head(c, data)
        elif state == R_CHUNKED:
            self._on_chunked(c, data, 0)
        else:  # R_CLOSE, R_TUNNEL
            c.send(data)

    def _on_head(self, c: Client, data: bytes) -> None:
        self.got = True
        if self.hbuf:
            self.hbuf += data
            data = bytes(self.hbuf)
            self.hbuf.clear()
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HEAD:
                self._bad(c, "response head too long")
            else:
                self.hbuf += data
            return
        hend = end + 4
        head = data if hend == len(data) else data[:hend]
        parsed = response_cache.get(head)  # inlined from parse_response_head: the hot path
        if parsed is None:
            try:
                parsed = parse_response_head(head)
            except MalformedMessage as exc:
                self._bad(c, exc.reason.decode().strip())
                return
        status, keep, length, te = parsed
        if status < 200 and status != 101:
            # 1xx: pass it on as is; the final response follows
            c.send(data[:hend])
            if hend < len(data):
                self._on_head(c, data[hend:])
            return
        self.status = status
        c.started = True
        header = c.header
        n = len(data)
        if c.is_head or status == 204 or status == 304:
            self.keep = keep and n == hend
            c.send((data if n == hend else data[:hend]).replace(b"\r\n", header, 1))
            self._complete(c)
        elif status == 101:
            self.state = R_TUNNEL
            c.send(data.replace(b"\r\n", header, 1))
            c.tunnel(self)
        elif te is not None:
            if te != b"chunked":
                self.keep = False
                self.state = R_CLOSE
                c.send(data.replace(b"\r\n", header, 1))
                return
            self.keep = keep
            self.chunks = ChunkedScanner(sys.maxsize)
            self.state = R_CHUNKED
            c.send(data[:hend].replace(b"\r\n", header, 1))
            self._on_chunked(c, data, hend)
        elif length >= 0:
            have = n - hend
            if have == length:  # the usual case: the whole response in one read
                self.keep = keep
                c.send(data.replace(b"\r\n", header, 1))
                self._complete(c)
            elif have > length:
                self.keep = False
                c.send(data[: hend + length].replace(b"\r\n", header, 1))
                self._complete(c)
            else:
                self.keep = keep
                self.left = length - have
                self.state = R_LENGTH
                c.send(data.replace(b"\r\n", header, 1))
        else:
            self.keep = False
            self.state = R_CLOSE
            c.send(data.replace(b"\r\n", header, 1))

    def _on_chunked(self, c: Client, data: bytes, pos: int) -> None:
        assert self.chunks is not None
        try:
            end = self.chunks.scan(data, pos)
        except BadFraming:
            self._bad(c, "malformed chunked response body")
            return
        if end < 0:
            if pos < len(data):
                c.send(data[pos:] if pos else data)
            return
        if end < len(data):
            self.keep = False
        if end > pos:
            c.send(data[pos:end])
        self._complete(c)

    def _complete(self, c: Client) -> None:
        self.state = R_IDLE
        self.client = None
        if self.chunks is not None:
            self.chunks = None
        if c.write_paused:
            self.transport.resume_reading()
        if not self.keep:
            c.keep = False
            self.close_transport()
        elif c.keep and c.req_done:
            pool = self.pool  # Pool.release, inlined: this runs once per request
            self.reused = True
            if pool.retired or len(pool.idle) >= pool.max_idle:
                self.close_transport()
            else:
                pool.idle.append(self)
        else:
            self.close_transport()
        c.done(self.status)

    def _bad(self, c: Client, why: str) -> None:
        log.warning("upstream %s:%s: %s", self.pool.backend.host, self.pool.backend.port, why)
        self.client = None
        self.state = R_IDLE
        self.abort_transport()
        c.upstream_broken()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.closed_one()
        c = self.client
        if c is None:
            self.pool.discard(self)
            return
        self.client = None
        state = self.state
        if state == R_CLOSE and exc is None:
            c.keep = False
            c.done(self.status)
        elif state == R_TUNNEL:
            c.close()
        elif not self.got:
            c.upstream_lost(self, exc)
        else:
            c.upstream_broken()

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause(PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume(PAUSE_UPSTREAM)
