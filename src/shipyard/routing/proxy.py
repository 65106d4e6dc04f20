"""Shipyard's traffic router (data plane): one asyncio HTTP/1.1 reverse proxy per service.

The local agent creates one :class:`ServiceProxy` per service, starts it on the service's stable
port, and calls :meth:`ServiceProxy.configure` whenever a rollout changes the revision weights;
:meth:`ServiceProxy.drain` says when an old revision may be stopped, and
:meth:`ServiceProxy.metrics` feeds canary analysis. ``python -m shipyard.routing.proxy`` runs one
standalone (the router benchmark does).

Why it looks the way it does: the router's own Python time per request is the budget (the rest is
kernel loopback work), so it is built on asyncio Protocols under uvloop with no task per request.
The request head is validated by one regular expression (results cached per distinct head) and
forwarded as the raw bytes the client sent; only the headers that decide framing, keep-alive and
stickiness are looked at. Responses stream back as they arrive, with ``x-shipyard-revision``
inserted after the status line. Writes are held and flushed once per event-loop iteration, so a
busy loop wakes its peers once per batch rather than once per request. Upstream connections are
kept alive in per-backend pools. Requests are not rewritten, so no ``X-Forwarded-*`` headers are
added, and a client's ``Connection: close`` reaches the upstream. A ``101 Switching Protocols``
answer turns the connection pair into a raw tunnel. A client that half-closes after its request
still gets the answer (the request stays in flight until the app answers it).

Everything here runs on the event loop that called :meth:`ServiceProxy.start`; call its methods
from that loop only (it is not thread-safe).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import sys
import time
from collections.abc import Mapping, Sequence

from shipyard.routing import metrics as routing_metrics
from shipyard.routing.http1 import (
    MAX_HEAD,
    BadFraming,
    BodyTooLarge,
    ChunkedScanner,
    MalformedMessage,
    local_response,
    parse_request_head,
    parse_response_head,
    request_cache,
    response_cache,
)
from shipyard.routing.table import (
    Backend,
    Route,
    Table,
    effective_weights,
    group_backends,
    validate_sticky_names,
    validate_weights,
)

__all__ = [
    "Backend",
    "MalformedMessage",
    "ServiceProxy",
    "main",
    "parse_request_head",
    "parse_response_head",
]

log = logging.getLogger(__name__)

# Latency clock: uvloop's loop.time() is cached per loop iteration in whole milliseconds.
_now = time.perf_counter

#: Request bodies up to this size are buffered before the request is sent, so it can be retried.
BUFFER_LIMIT = 64 * 1024
#: Pipelined bytes held per client while a request is in flight before reading pauses.
_PIPELINE_LIMIT = 256 * 1024
#: Streamed request-body bytes held while the upstream connection is being opened.
_STREAM_HOLD = 256 * 1024
#: One request is sent at most this many times (the first try and two retries).
MAX_ATTEMPTS = 3
#: After a failed connect, a backend is skipped by new requests for this long (if others remain).
_DOWN_SECONDS = 2.0

_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))

# client modes
_IDLE = 0  # waiting for a request head
_BUFFER = 1  # head parsed, buffering a small body
_STREAM = 2  # request sent, its body still streaming from the client
_WAIT = 3  # request fully received, waiting for the response (later bytes are pipelined)
_TUNNEL = 4  # after 101 Switching Protocols: bytes pass both ways unparsed
_CLOSED = 5

# upstream (response) states
_R_IDLE = 0
_R_HEAD = 1
_R_LENGTH = 2
_R_CHUNKED = 3
_R_CLOSE = 4  # body delimited by the upstream closing the connection
_R_TUNNEL = 5

# why reading from a client is paused (bit flags)
_PAUSE_PIPELINE = 1
_PAUSE_UPSTREAM = 2


class _Pool:
    """Keep-alive connections to one backend: the idle ones, and a count of all that are open
    or opening (so a retired backend's drain knows when its last exchange has finished)."""

    __slots__ = ("backend", "conns", "down_until", "drained", "idle", "max_idle", "retired")

    def __init__(self, backend: Backend, max_idle: int) -> None:
        self.backend = backend
        self.max_idle = max_idle
        self.idle: list[_Upstream] = []
        self.retired = False
        self.down_until = 0.0
        self.conns = 0
        self.drained: asyncio.Event | None = None

    def closed_one(self) -> None:
        """A connection of this pool closed (or failed to open)."""
        self.conns -= 1
        if self.conns == 0 and self.drained is not None:
            self.drained.set()

    def release(self, up: _Upstream) -> None:
        up.reused = True
        if self.retired or len(self.idle) >= self.max_idle:
            up._close_transport()
        else:
            self.idle.append(up)  # (if it closes meanwhile, whoever pops it skips it)

    def discard(self, up: _Upstream) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(up)

    def retire(self) -> None:
        self.retired = True
        for up in self.idle:
            up._close_transport()
        self.idle.clear()


class _Conn(asyncio.Protocol):
    """A connection whose writes are held until the end of the event-loop iteration.

    Why: under load one iteration handles many requests; writing each the moment it is ready
    wakes the peer (wrk, nginx) once per request, which on a small machine costs more CPU than
    the proxying itself. Flushing once per iteration (``ServiceProxy._flush``) lets the kernel
    and the peers handle a batch per wake-up. All writes to a transport go through ``_send`` so
    their order is kept; ``_close_transport`` flushes before closing.
    """

    transport: asyncio.Transport

    __slots__ = ("out", "proxy", "transport")

    def __init__(self, proxy: ServiceProxy) -> None:
        self.proxy = proxy
        self.out: bytes | None = None

    def _send(self, data: bytes) -> None:
        out = self.out
        if out is None:
            self.out = data
            proxy = self.proxy
            proxy._dirty.append(self)
            if not proxy._flush_scheduled:
                proxy._flush_scheduled = True
                proxy._loop.call_soon(proxy._flush)
        else:  # a second write in the same iteration (body chunks, pipelining): rare
            self.out = out + data

    def _close_transport(self) -> None:
        out = self.out
        if out is not None:
            self.out = None
            if not self.transport.is_closing():
                self.transport.write(out)
        self.transport.close()

    def _abort_transport(self) -> None:
        self.out = None
        self.transport.abort()


class _Upstream(_Conn):
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

    def __init__(self, pool: _Pool, proxy: ServiceProxy) -> None:
        super().__init__(proxy)
        self.pool = pool
        self.client: _Client | None = None
        self.state = _R_IDLE
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
            self._close_transport()
            return
        c.idle_ticks = 0
        state = self.state
        if state == _R_LENGTH:
            left = self.left
            n = len(data)
            if n < left:
                self.left = left - n
                c._send(data)
                return
            if n > left:
                data = data[:left]
                self.keep = False
            self.left = 0
            c._send(data)
            self._complete(c)
        elif state == _R_HEAD:
            self._on_head(c, data)
        elif state == _R_CHUNKED:
            self._on_chunked(c, data, 0)
        else:  # _R_CLOSE, _R_TUNNEL
            c._send(data)

    def _on_head(self, c: _Client, data: bytes) -> None:
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
            c._send(data[:hend])
            if hend < len(data):
                self._on_head(c, data[hend:])
            return
        self.status = status
        c.started = True
        header = c.header
        n = len(data)
        if c.is_head or status == 204 or status == 304:
            self.keep = keep and n == hend
            c._send((data if n == hend else data[:hend]).replace(b"\r\n", header, 1))
            self._complete(c)
        elif status == 101:
            self.state = _R_TUNNEL
            c._send(data.replace(b"\r\n", header, 1))
            c._tunnel(self)
        elif te is not None:
            if te != b"chunked":
                self.keep = False
                self.state = _R_CLOSE
                c._send(data.replace(b"\r\n", header, 1))
                return
            self.keep = keep
            self.chunks = ChunkedScanner(sys.maxsize)
            self.state = _R_CHUNKED
            c._send(data[:hend].replace(b"\r\n", header, 1))
            self._on_chunked(c, data, hend)
        elif length >= 0:
            have = n - hend
            if have == length:  # the usual case: the whole response in one read
                self.keep = keep
                c._send(data.replace(b"\r\n", header, 1))
                self._complete(c)
            elif have > length:
                self.keep = False
                c._send(data[: hend + length].replace(b"\r\n", header, 1))
                self._complete(c)
            else:
                self.keep = keep
                self.left = length - have
                self.state = _R_LENGTH
                c._send(data.replace(b"\r\n", header, 1))
        else:
            self.keep = False
            self.state = _R_CLOSE
            c._send(data.replace(b"\r\n", header, 1))

    def _on_chunked(self, c: _Client, data: bytes, pos: int) -> None:
        assert self.chunks is not None
        try:
            end = self.chunks.scan(data, pos)
        except BadFraming:
            self._bad(c, "malformed chunked response body")
            return
        if end < 0:
            if pos < len(data):
                c._send(data[pos:] if pos else data)
            return
        if end < len(data):
            self.keep = False
        if end > pos:
            c._send(data[pos:end])
        self._complete(c)

    def _complete(self, c: _Client) -> None:
        self.state = _R_IDLE
        self.client = None
        if self.chunks is not None:
            self.chunks = None
        if c.write_paused:
            self.transport.resume_reading()
        if not self.keep:
            c.keep = False
            self._close_transport()
        elif c.keep and c.req_done:
            pool = self.pool  # release to the pool, inlined: this runs once per request
            self.reused = True
            if pool.retired or len(pool.idle) >= pool.max_idle:
                self._close_transport()
            else:
                pool.idle.append(self)
        else:
            self._close_transport()
        c._done(self.status)

    def _bad(self, c: _Client, why: str) -> None:
        log.warning("upstream %s:%s: %s", self.pool.backend.host, self.pool.backend.port, why)
        self.client = None
        self.state = _R_IDLE
        self._abort_transport()
        c._upstream_broken()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.closed_one()
        c = self.client
        if c is None:
            self.pool.discard(self)
            return
        self.client = None
        state = self.state
        if state == _R_CLOSE and exc is None:
            c.keep = False
            c._done(self.status)
        elif state == _R_TUNNEL:
            c._close()
        elif not self.got:
            c._upstream_lost(self, exc)
        else:
            c._upstream_broken()

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client._pause(_PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client._resume(_PAUSE_UPSTREAM)


class _Client(_Conn):
    """One client connection: parses requests in order, routes each, relays the response."""

    __slots__ = (
        "attempts",
        "body_left",
        "chunks",
        "counters",
        "eof",
        "failed",
        "gen",
        "head_len",
        "header",
        "idle_ticks",
        "is_head",
        "keep",
        "key",
        "method",
        "mode",
        "pending",
        "processing",
        "read_paused",
        "req",
        "req_done",
        "route",
        "scan_pos",
        "sent_any",
        "started",
        "stream_buf",
        "streaming",
        "t0",
        "upstream",
        "write_paused",
    )

    def __init__(self, proxy: ServiceProxy) -> None:
        super().__init__(proxy)
        self.mode = _IDLE
        self.pending = bytearray()
        self.processing = False
        self.eof = False
        self.read_paused = 0
        self.write_paused = False
        self.keep = True
        self.is_head = False
        self.method = b"GET"
        self.key: bytes | None = None
        self.req: bytes | None = None
        self.req_done = True
        self.streaming = False
        self.stream_buf = bytearray()
        self.sent_any = False
        self.body_left = 0
        self.head_len = 0
        self.scan_pos = 0
        self.chunks: ChunkedScanner | None = None
        self.route: Route[_Pool] | None = None
        self.header = b""
        self.counters: routing_metrics.RevisionCounters | None = None
        self.t0 = 0.0
        self.upstream: _Upstream | None = None
        self.attempts = 0
        self.failed: set[_Pool] | None = None
        self.gen = 0
        self.idle_ticks = 0
        self.started = False

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.proxy._clients.add(self)

    def data_received(self, data: bytes) -> None:
        mode = self.mode
        if mode == _IDLE:
            if self.pending:
                self.pending += data
                data = bytes(self.pending)
                self.pending.clear()
            self._feed(data)
        elif mode == _STREAM:
            self._stream_body(data)
        elif mode == _WAIT:
            self.pending += data
            if len(self.pending) > _PIPELINE_LIMIT:
                self._pause(_PAUSE_PIPELINE)
        elif mode == _BUFFER:
            self.pending += data
            self._buffer_more()
        elif mode == _TUNNEL and self.upstream is not None:
            self.upstream._send(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        up = self.upstream
        if self.mode == _TUNNEL and up is not None:
            if up.out is not None:
                up.transport.write(up.out)
                up.out = None
            if up.transport.can_write_eof():
                up.transport.write_eof()
            return True
        # A client may half-close after its last request: still answer what was asked in full.
        return True if self.mode == _WAIT else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.mode = _CLOSED
        self.proxy._clients.discard(self)
        self.gen += 1
        up = self.upstream
        self.upstream = None
        if up is not None:
            up.client = None
            up._abort_transport()
        self.out = None
        c = self.counters
        if c is not None:
            self.counters = None
            c.requests += 1
            c.client_aborts += 1
            self._leave(c)
        self.pending.clear()
        self.stream_buf.clear()
        self.req = None

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    # -- request side -----------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Parse and route the requests in ``data``, one at a time, in order."""
        self.processing = True
        try:
            while data:
                if self.mode != _IDLE:
                    if self.mode != _CLOSED:
                        self.pending += data
                        if len(self.pending) > _PIPELINE_LIMIT:
                            self._pause(_PAUSE_PIPELINE)
                    return
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    if data[:1] == b"\r" or data[:1] == b"\n":
                        data = data.lstrip(b"\r\n")  # stray CRLF after a body: ignored (RFC 9112)
                        continue
                    if len(data) > MAX_HEAD:
                        self._reject(431, b"request head too large\n")
                    elif self.eof:
                        self._close()
                    else:
                        self.pending += data
                    return
                hend = end + 4
                if hend > MAX_HEAD:
                    self._reject(431, b"request head too large\n")
                    return
                head = data if hend == len(data) else data[:hend]
                parsed = request_cache.get(head)  # inlined from parse_request_head: hot path
                if parsed is None:
                    try:
                        parsed = parse_request_head(head)
                    except MalformedMessage as exc:
                        if data[:1] == b"\r" or data[:1] == b"\n":
                            data = data.lstrip(b"\r\n")
                            continue
                        self._reject(exc.status, exc.reason)
                        return
                method, keep, length, te, expect = parsed
                self.keep = keep
                self.is_head = method == b"HEAD"
                self.method = method
                table = self.proxy._table
                self.key = table.sticky_key(head) if table.sticky is not None else None
                if te is not None:
                    chunks = ChunkedScanner(self.proxy._max_body)
                    try:
                        body_end = chunks.scan(data, hend)
                    except BodyTooLarge:
                        self._reject(413, b"request body too large\n")
                        return
                    except BadFraming:
                        self._reject(400, b"malformed chunked body\n")
                        return
                    if body_end >= 0:
                        self._dispatch(data if body_end == len(data) else data[:body_end])
                        data = data[body_end:]
                        continue
                    self.chunks = chunks
                    if expect or len(data) - hend > BUFFER_LIMIT:
                        self._dispatch_stream(data)
                        return
                    self.mode = _BUFFER
                    self.head_len = hend
                    self.scan_pos = len(data)
                    self.pending += data
                    return
                if length > 0:
                    if length > self.proxy._max_body:
                        self._reject(413, b"request body too large\n")
                        return
                    total = hend + length
                    if len(data) >= total:
                        self._dispatch(data if total == len(data) else data[:total])
                        data = data[total:]
                        continue
                    self.chunks = None
                    if expect or length > BUFFER_LIMIT:
                        self.body_left = total - len(data)
                        self._dispatch_stream(data)
                        return
                    self.mode = _BUFFER
                    self.body_left = total
                    self.pending += data
                    return
                self._dispatch(head)
                data = data[hend:] if hend != len(data) else b""
        finally:
            self.processing = False

    def _buffer_more(self) -> None:
        """More body bytes of a small request arrived (they are in ``pending``)."""
        buf = self.pending
        chunks = self.chunks
        if chunks is None:
            end = self.body_left
            if len(buf) < end:
                return
        else:
            try:
                end = chunks.scan(buf, self.scan_pos)
            except BodyTooLarge:
                self._reject(413, b"request body too large\n")
                return
            except BadFraming:
                self._reject(400, b"malformed chunked body\n")
                return
            if end < 0:
                self.scan_pos = len(buf)
                if len(buf) - self.head_len > BUFFER_LIMIT:  # too big to hold: stream it
                    data = bytes(buf)
                    buf.clear()
                    self._dispatch_stream(data)
                return
            self.chunks = None
        data = bytes(buf)
        buf.clear()
        self.processing = True
        try:
            self._dispatch(data[:end])
        finally:
            self.processing = False
        if end < len(data):
            self._feed(data[end:])
        elif self.mode == _IDLE and self.eof:
            self._close()

    def _stream_body(self, data: bytes) -> None:
        """Forward body bytes of a streamed request; what follows its end is pipelined."""
        chunks = self.chunks
        if chunks is None:
            left = self.body_left
            n = len(data)
            if n < left:
                self.body_left = left - n
                self._send_body(data)
                return
            end = left
            self.body_left = 0
        else:
            try:
                end = chunks.scan(data, 0)
            except BodyTooLarge:
                self._body_error(413, b"request body too large\n")
                return
            except BadFraming:
                self._body_error(400, b"malformed chunked body\n")
                return
            if end < 0:
                self._send_body(data)
                return
            self.chunks = None
        self._send_body(data if end == len(data) else data[:end])
        self.req_done = True
        self.mode = _WAIT
        if end < len(data):
            self.pending += data[end:]

    def _send_body(self, body: bytes) -> None:
        up = self.upstream
        self.idle_ticks = 0
        if up is not None:
            up._send(body)
        else:  # still connecting
            self.stream_buf += body
            if len(self.stream_buf) > _STREAM_HOLD:
                self._pause(_PAUSE_UPSTREAM)

    def _body_error(self, status: int, body: bytes) -> None:
        self._drop_upstream()
        if self.started:
            self.keep = False
            self._abort_transport()
            self._done(status)
        else:
            self._local(status, body, close=True)

    # -- routing ----------------------------------------------------------------------------

    def _dispatch(self, req: bytes) -> None:
        """Route a fully received request (head and body in ``req``); retryable."""
        self.req = req
        self.req_done = True
        self.streaming = False
        self.mode = _WAIT
        self._start()

    def _dispatch_stream(self, data: bytes) -> None:
        """Route a request whose body is still arriving; ``data`` is its head and body so far."""
        self.req = None
        self.req_done = False
        self.streaming = True
        self.sent_any = False
        self.stream_buf += data
        self.mode = _STREAM
        self._start()

    def _start(self) -> None:
        route = self.proxy._table.pick(self.key)
        self.started = False
        if route is None:
            self.route = None
            self.proxy.unrouted += 1
            self._local(503, b"no backend is serving this service\n")
            return
        self.route = route
        self.header = route.crlf_header
        c = self.counters = route.counters
        c.inflight += 1
        self.t0 = _now()
        self.attempts = 1
        self.idle_ticks = 0
        pool = route.next_pool()
        idle = pool.idle
        if idle and not self.streaming:  # the hot path: a pooled connection, a whole request
            up = idle.pop()  # most recently used first: least likely to have been closed
            transport = up.transport
            if not transport.is_closing():
                self.upstream = up
                up.client = self
                up.state = _R_HEAD
                up.got = False
                if self.write_paused:
                    transport.pause_reading()
                up._send(self.req)  # type: ignore[arg-type]
                return
        self._use_pool(pool, fresh=False)

    def _use_pool(self, pool: _Pool, *, fresh: bool) -> None:
        if not fresh:
            idle = pool.idle
            while idle:
                up = idle.pop()  # most recently used first: least likely to have been closed
                if not up.transport.is_closing():
                    self._attach(up)
                    return
        self.proxy._connect(pool, self, self.gen)

    def _attach(self, up: _Upstream) -> None:
        self.upstream = up
        up.client = self
        up.state = _R_HEAD
        up.got = False
        up.status = 0
        self.idle_ticks = 0
        if self.write_paused:
            up.transport.pause_reading()
        if self.streaming:
            self.sent_any = True
            if self.stream_buf:
                up._send(bytes(self.stream_buf))
                self.stream_buf.clear()
            self._resume(_PAUSE_UPSTREAM)
        else:
            assert self.req is not None
            up._send(self.req)

    def _connect_failed(self, pool: _Pool, exc: BaseException) -> None:
        backend = pool.backend
        log.info(
            "cannot connect to %s (%s:%s): %r", backend.replica_id, backend.host, backend.port, exc
        )
        pool.down_until = time.monotonic() + _DOWN_SECONDS
        if self.failed is None:
            self.failed = set()
        self.failed.add(pool)
        self._retry(pool, elsewhere=True)

    def _upstream_lost(self, up: _Upstream, exc: BaseException | None) -> None:
        """The upstream closed before any response byte: retry if the request was not consumed.

        A pooled keep-alive connection the backend had already closed is the ordinary race:
        try the same backend on a fresh connection. A *fresh* connection lost means the
        backend itself is going away (a killed replica): it counts as failed and the retry goes
        to another backend, as nginx's ``proxy_next_upstream error`` does.
        """
        self.upstream = None
        pool = up.pool
        if up.reused and not pool.retired:
            self._retry(pool, elsewhere=False)
        elif up.reused or self.method in _IDEMPOTENT:
            if self.failed is None:
                self.failed = set()
            self.failed.add(pool)
            self._retry(pool, elsewhere=True)
        else:
            self._local(502, b"upstream closed the connection\n", upstream_error=True)

    def _retry(self, pool: _Pool, *, elsewhere: bool) -> None:
        replayable = self.req is not None or (self.streaming and not self.sent_any)
        c = self.counters
        if not replayable or self.attempts >= MAX_ATTEMPTS or c is None:
            self._local(502, b"no backend answered\n", upstream_error=True)
            return
        self.attempts += 1
        c.retries += 1
        if elsewhere:
            pool = self._alternative() or pool
        self._use_pool(pool, fresh=True)

    def _alternative(self) -> _Pool | None:
        """Another backend for a retry: same revision first, then any routed revision."""
        failed = self.failed or set()
        table = self.proxy._table
        current = self.route
        route = table.by_revision.get(current.revision) if current is not None else None
        if route is not None:
            now = time.monotonic()
            candidates = [p for p in route.pools if p not in failed]
            for pool in candidates:
                if pool.down_until <= now:
                    return pool
            if candidates:
                return candidates[0]
        for other in table.routes:
            if other is route:
                continue
            for pool in other.pools:
                if pool not in failed:
                    self._move(other)
                    return pool
        return None

    def _move(self, route: Route[_Pool]) -> None:
        old = self.counters
        if old is not None:
            self._leave(old)
        self.route = route
        self.header = route.crlf_header
        c = self.counters = route.counters
        c.inflight += 1

    def _drop_upstream(self) -> None:
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.client = None
            up._abort_transport()

    def _tunnel(self, up: _Upstream) -> None:
        """101 Switching Protocols: the request is answered; relay raw bytes from now on."""
        c = self.counters
        if c is not None:
            self.counters = None
            c.requests += 1
            self._leave(c)
        self.mode = _TUNNEL
        if self.pending:
            up._send(bytes(self.pending))
            self.pending.clear()
        self._resume(_PAUSE_PIPELINE)

    def _timeout(self) -> None:
        self._drop_upstream()
        if self.started:
            self._upstream_broken()
        else:
            self._local(504, b"upstream did not answer in time\n", upstream_error=True)

    def _upstream_broken(self) -> None:
        """The upstream failed after the request was sent (bad response, reset midway)."""
        self.upstream = None
        if self.started:  # the client has part of a response: cut it off visibly
            self.keep = False
            self._abort_transport()
            self._done(502, upstream_error=True)
        else:
            self._local(502, b"upstream failed\n", upstream_error=True)

    # -- responses and bookkeeping ----------------------------------------------------------

    def _local(
        self, status: int, body: bytes, *, close: bool = False, upstream_error: bool = False
    ) -> None:
        """Answer the current request from the router itself."""
        self._drop_upstream()
        keep = self.keep and self.req_done and not close
        route = self.route
        self._send(local_response(status, body, route.header if route else b"", keep, self.is_head))
        self.keep = keep
        self.started = True
        self._done(status, upstream_error)

    def _reject(self, status: int, body: bytes) -> None:
        """Answer a request that cannot be routed (malformed, too large) and close."""
        self._send(local_response(status, body, b"", False, False))
        self._close()

    def _done(self, status: int, upstream_error: bool = False) -> None:
        """The current exchange is over: count it, then go on with the next request or close."""
        c = self.counters
        if c is not None:
            self.counters = None
            c.observe(status, _now() - self.t0)
            if upstream_error:
                c.upstream_errors += 1
            c.inflight -= 1
            if not c.inflight and self.proxy._drain_waiters:
                self.proxy._wake(c.revision)
        self.upstream = None
        self.req = None
        self.gen += 1
        if self.failed is not None:
            self.failed = None
        if self.stream_buf:
            self.stream_buf.clear()
        if self.mode == _CLOSED:
            return
        if not self.keep or not self.req_done:
            self._close()
            return
        self.mode = _IDLE
        if self.read_paused:
            self._resume(_PAUSE_PIPELINE)
        if self.processing:
            return  # _feed is on the stack and goes on with the next request
        if self.pending:
            data = bytes(self.pending)
            self.pending.clear()
            self._feed(data)
        elif self.eof:
            self._close()

    def _leave(self, c: routing_metrics.RevisionCounters) -> None:
        c.inflight -= 1
        if not c.inflight and self.proxy._drain_waiters:
            self.proxy._wake(c.revision)

    def _close(self) -> None:
        self.mode = _CLOSED
        self._close_transport()

    def _pause(self, why: int) -> None:
        if not self.read_paused and self.mode != _CLOSED:
            self.transport.pause_reading()
        self.read_paused |= why

    def _resume(self, why: int) -> None:
        if self.read_paused & why:
            self.read_paused &= ~why
            if not self.read_paused and self.mode != _CLOSED:
                self.transport.resume_reading()


class ServiceProxy:
    """The router of one service: a listening port, a routing table, pools, metrics."""

    _loop: asyncio.AbstractEventLoop  # set by start()

    def __init__(
        self,
        service: str,
        *,
        max_body_bytes: int = 10 * 2**20,
        connect_timeout: float = 2.0,
        response_timeout: float = 60.0,
        max_idle_per_backend: int = 64,
    ) -> None:
        self.service = service
        self._max_body = max_body_bytes
        self._connect_timeout = connect_timeout
        self._response_timeout = response_timeout
        self._max_idle = max_idle_per_backend
        self._table: Table[_Pool] = Table({}, [], None, None)
        self._pools: dict[Backend, _Pool] = {}
        #: Backends taken out of the table, by replica id, until drained (``drain_replica``).
        self._retired: dict[str, _Pool] = {}
        self._counters: dict[str, routing_metrics.RevisionCounters] = {}
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._drain_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._server: asyncio.Server | None = None
        self._closed = False
        #: Requests answered 503 because no revision had a backend.
        self.unrouted = 0
        self._dirty: list[_Conn] = []  # connections with writes held for this loop iteration
        self._flush_scheduled = False

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 = any free port); returns the bound port."""
        if self._server is not None:
            raise RuntimeError(f"router for {self.service!r} is already started")
        loop = asyncio.get_running_loop()
        self._loop = loop
        try:
            server = await loop.create_server(
                lambda: _Client(self), host, port, reuse_address=True, backlog=1024
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"router for service {self.service!r} cannot listen on {host}:{port}: "
                f"{exc.strerror or exc}; is another process using the port? "
                "Pick another port or stop that process.",
            ) from exc
        self._server = server
        sweeper = loop.create_task(self._sweep(), name=f"shipyard-router-{self.service}-timeouts")
        self._tasks.add(sweeper)
        sockets = server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    def configure(
        self,
        weights: Mapping[str, int],
        backends: Sequence[Backend],
        sticky_header: str | None = None,
        sticky_cookie: str | None = None,
    ) -> None:
        """Atomically replace the routing table.

        ``weights`` maps revision -> percent (ints summing to 100; empty or all zero = no
        traffic). A revision with weight but no backend gives its share to the others. Requests
        already routed finish where they are; new ones follow the new table.
        """
        requested = validate_weights(weights)
        validate_sticky_names(sticky_header, sticky_cookie)
        by_revision = group_backends(backends)
        effective = effective_weights(requested, set(by_revision))
        pools: dict[Backend, _Pool] = {}
        routes: list[Route[_Pool]] = []
        for revision, weight in effective.items():
            counters = self._counters.get(revision)
            if counters is None:
                counters = self._counters[revision] = routing_metrics.RevisionCounters(revision)
            if weight == 0:
                continue
            route_pools = []
            for backend in by_revision[revision]:
                pool = self._pools.get(backend) or _Pool(backend, self._max_idle)
                pools[backend] = pool
                route_pools.append(pool)
            routes.append(Route(revision, route_pools, counters))
        for backend, pool in self._pools.items():
            if backend not in pools:
                pool.retire()
                self._retired[backend.replica_id] = pool
        for backend in pools:
            self._retired.pop(backend.replica_id, None)
        self._pools = pools
        self._table = Table(effective, routes, sticky_header, sticky_cookie)

    @property
    def weights(self) -> dict[str, int]:
        """What is routed now: revision -> percent, shares of backend-less revisions moved."""
        return dict(self._table.weights)

    def sticky_revision(self, key: str | bytes) -> str | None:
        """The revision a request carrying sticky ``key`` goes to now.

        None when no sticky header/cookie is configured or nothing is routed.
        """
        table = self._table
        if table.sticky is None:
            return None
        route = table.pick(key.encode() if isinstance(key, str) else key)
        return route.revision if route is not None else None

    def inflight(self, revision: str | None = None) -> int:
        """Requests routed and not yet finished, for one revision or all."""
        if revision is None:
            return sum(c.inflight for c in self._counters.values())
        c = self._counters.get(revision)
        return c.inflight if c is not None else 0

    async def drain(self, revision: str, timeout: float) -> bool:
        """Wait until ``revision`` has no request in flight; False if ``timeout`` passed first."""
        c = self._counters.get(revision)
        if c is None or c.inflight == 0:
            return True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while c.inflight and not self._closed:
                    fut: asyncio.Future[None] = loop.create_future()
                    waiters = self._drain_waiters.setdefault(revision, [])
                    waiters.append(fut)
                    try:
                        await fut
                    finally:
                        if fut in waiters:
                            waiters.remove(fut)
                        if not waiters:
                            self._drain_waiters.pop(revision, None)
        except TimeoutError:
            return False
        return c.inflight == 0

    async def drain_replica(self, replica_id: str, timeout: float) -> bool:
        """After ``configure`` dropped a backend: wait until every connection to it has closed,
        i.e. the requests it held have been answered (a retired pool keeps no idle connection).
        False if ``timeout`` passed first, or if the backend is still routed."""
        if any(b.replica_id == replica_id for b in self._pools):
            return False
        pool = self._retired.get(replica_id)
        if pool is None or pool.conns <= 0:
            self._retired.pop(replica_id, None)
            return True
        pool.drained = pool.drained or asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await pool.drained.wait()
        except TimeoutError:
            return False
        self._retired.pop(replica_id, None)
        return True

    def metrics(self) -> dict[str, routing_metrics.RevisionMetrics]:
        """Snapshots of every revision's counters since the router started."""
        return {rev: c.snapshot() for rev, c in self._counters.items()}

    async def close(self) -> None:
        """Stop listening, cut open connections, close pooled ones. Idempotent."""
        if self._closed:
            return
        self._closed = True
        server = self._server
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        for client in list(self._clients):
            client._abort_transport()
        for pool in self._pools.values():
            pool.retire()
        self._table = Table({}, [], None, None)
        for waiters in list(self._drain_waiters.values()):
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await server.wait_closed()

    # -- internals used by the protocols ------------------------------------------------------

    def _flush(self) -> None:
        """Write what the last loop iteration produced, one write per connection."""
        self._flush_scheduled = False
        dirty = self._dirty
        self._dirty = []
        for conn in dirty:
            out = conn.out
            if out is not None:
                conn.out = None
                if not conn.transport.is_closing():
                    conn.transport.write(out)

    def _wake(self, revision: str) -> None:
        for fut in self._drain_waiters.get(revision, ()):
            if not fut.done():
                fut.set_result(None)

    def _connect(self, pool: _Pool, client: _Client, gen: int) -> None:
        task = self._loop.create_task(self._open(pool, client, gen))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, pool: _Pool, client: _Client, gen: int) -> None:
        backend = pool.backend

        def factory() -> _Upstream:
            return _Upstream(pool, self)

        pool.conns += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, up = await self._loop.create_connection(factory, backend.host, backend.port)
        except (OSError, TimeoutError) as exc:
            pool.closed_one()
            if client.gen == gen and client.mode != _CLOSED:
                client._connect_failed(pool, exc)
            return
        if client.gen == gen and client.mode != _CLOSED:
            client._attach(up)
        else:  # the client went away meanwhile: keep the connection for the next one
            pool.release(up)

    async def _sweep(self) -> None:
        """Answer 504 for requests whose upstream has been silent for ``response_timeout``."""
        tick = min(1.0, max(0.01, self._response_timeout / 8))
        limit = math.ceil(self._response_timeout / tick)
        while True:
            await asyncio.sleep(tick)
            for client in list(self._clients):
                # (a client too slow to take the response pauses the upstream: not its fault)
                if (
                    client.upstream is not None
                    and client.counters is not None
                    and not client.write_paused
                ):
                    client.idle_ticks += 1
                    if client.idle_ticks > limit:
                        client._timeout()


# -- command line (used by bench/bench_router.py) -------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m shipyard.routing.proxy",
        description="Run one Shipyard service router in front of fixed backends (uvloop).",
    )
    parser.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT")
    parser.add_argument(
        "--backend", action="append", default=[], metavar="REV=HOST:PORT", required=True
    )
    parser.add_argument(
        "--weight", action="append", default=[], metavar="REV=N", help="default: even split"
    )
    parser.add_argument("--service", default="cli")
    parser.add_argument("--sticky-header")
    parser.add_argument("--sticky-cookie")
    return parser.parse_args(argv)


def _split_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shipyard.routing.proxy --listen H:P --backend REV=H:P [--weight REV=N]``."""
    import uvloop

    args = _parse_args(argv)
    host, port = _split_hostport(args.listen)
    backends: list[Backend] = []
    for i, spec in enumerate(args.backend):
        revision, sep, address = spec.partition("=")
        if not sep:
            raise SystemExit(f"--backend expects REV=HOST:PORT, got {spec!r}")
        bhost, bport = _split_hostport(address)
        backends.append(Backend(f"{revision}-{i}", revision, bhost, bport))
    weights: dict[str, int] = {}
    for spec in args.weight:
        revision, sep, value = spec.partition("=")
        if not sep or not value.isdigit():
            raise SystemExit(f"--weight expects REV=N, got {spec!r}")
        weights[revision] = int(value)
    if not weights:
        revisions = list(dict.fromkeys(b.revision for b in backends))
        share, extra = divmod(100, len(revisions))
        weights = {rev: share + (extra if i == 0 else 0) for i, rev in enumerate(revisions)}

    async def serve() -> None:
        proxy = ServiceProxy(args.service)
        try:
            proxy.configure(weights, backends, args.sticky_header, args.sticky_cookie)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
        bound = await proxy.start(host, port)
        print(f"shipyard router for {args.service!r} listening on {host}:{bound}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await proxy.close()

    uvloop.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
