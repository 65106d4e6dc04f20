"""The upstream protocol: one connection to a backend, reading the response to a request.

``routing.pool`` opens these and keeps the idle ones; ``routing.client`` attaches one to a
request and writes the request through it. This side parses the response's framing (interim 1xx,
Content-Length, chunked, close-delimited, 101 tunnel), streams the bytes to the client as they
arrive with the route's header (``x-shipyard-revision`` when the service asks for it, and
``Connection: close`` when the client's connection ends) inserted after the status line (one
``bytes.replace``), and
tells the client when the response is complete, broken or lost; then the connection goes back to
its pool or is closed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import sys
from typing import TYPE_CHECKING

from shipyard.routing import http1
from shipyard.routing.batching import BatchedConnection, WriteBatcher
from shipyard.routing.client import PAUSE_UPSTREAM, STREAMING_BODY
from shipyard.routing.http1 import (
    MAX_HEAD,
    BadFraming,
    ChunkedScanner,
    MalformedMessage,
    parse_response_head,
)

if TYPE_CHECKING:
    from shipyard.routing.client import Client
    from shipyard.routing.pool import Pool

__all__ = ["ResponsePhase", "Upstream"]

# Bound by assignment, not imported by name: CPython 3.11 compiles ``name.get(...)`` on a name that
# came from ``from ... import`` as an attribute load plus a call, which creates a bound method on
# every request (about 450 machine instructions each, measured with cachegrind), where an assigned
# global gets LOAD_METHOD.
_response_cache = http1.response_cache

# The router's log lines keep the name they had when it was one module.
log = logging.getLogger("shipyard.routing.proxy")


class ResponsePhase(enum.Enum):
    """Where an upstream connection is in the response it reads.

    ``HEAD`` until a final status arrives (also while idle in its pool: an idle connection
    that receives anything is closed), then one of the body framings until the response is
    complete, and ``HEAD`` again for the next request on the connection.
    """

    HEAD = "head"  # awaiting a response head (1xx interim responses pass through)
    LENGTH = "length"  # relaying a Content-Length body
    CHUNKED = "chunked"  # relaying a chunked body
    UNTIL_CLOSE = "until close"  # body delimited by the upstream closing the connection
    TUNNEL = "tunnel"  # after 101 Switching Protocols: bytes pass unparsed


# Module globals for the hot path (see routing.client: Enum member lookups are slow on 3.11).
HEAD = ResponsePhase.HEAD
LENGTH = ResponsePhase.LENGTH
CHUNKED = ResponsePhase.CHUNKED
UNTIL_CLOSE = ResponsePhase.UNTIL_CLOSE
TUNNEL = ResponsePhase.TUNNEL


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
        self.state = HEAD
        self.reused = False  # served a request before: its close may mean "idle too long"
        self.got = False  # a byte of the current response arrived
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
        if state is LENGTH:
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
        elif state is HEAD:
            self._on_head(c, data)
        elif state is CHUNKED:
            self._on_chunked(c, data, 0)
        else:  # UNTIL_CLOSE, TUNNEL
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
        parsed = _response_cache.get(head)  # inlined from parse_response_head: the hot path
        if parsed is None:
            try:
                parsed = parse_response_head(head)
            except MalformedMessage as exc:
                self._bad(c, exc.reason.decode().strip())
                return
        status, keep, length, te, forward = parsed
        if forward is not None:  # hop-by-hop fields to drop (http1.parse_response_head)
            data = forward + data[hend:]
            hend = len(forward)
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
            self.state = TUNNEL
            c.send(data.replace(b"\r\n", header, 1))
            c.tunnel(self)
        elif te is not None:
            if te != b"chunked":
                self.keep = False
                self.state = UNTIL_CLOSE
                c.send(data.replace(b"\r\n", header, 1))
                return
            self.keep = keep
            self.chunks = ChunkedScanner(sys.maxsize)
            self.state = CHUNKED
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
                self.state = LENGTH
                c.send(data.replace(b"\r\n", header, 1))
        else:
            self.keep = False
            self.state = UNTIL_CLOSE
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
        # ready for the next exchange on this connection, if it is kept
        self.state = HEAD
        self.got = False
        self.client = None
        if self.chunks is not None:
            self.chunks = None
        if c.write_paused:
            self.transport.resume_reading()
        if not self.keep:
            c.keep = False
            self.close_transport()
        elif (
            c.keep and c.phase is not STREAMING_BODY and (not c.with_body or c.body_consumed(self))
        ):  # the request was sent whole, and read whole (no part of it left for the next one)
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
        if state is UNTIL_CLOSE and exc is None:
            c.keep = False
            c.done(self.status)
        elif state is TUNNEL:
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
