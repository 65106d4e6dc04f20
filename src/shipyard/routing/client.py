"""The client protocol: one client connection, its requests parsed in order, routed, answered.

``ServiceProxy.start`` (``routing.proxy``) makes one :class:`Client` per accepted connection,
handing it the proxy's ``ProxyContext``. For each request it parses the head
(``routing.http1``), buffers a small body (so the request can be retried) or streams a large one,
picks a revision and backend from the context's routing table, takes a pooled upstream connection
(``routing.pool``) or has one opened, and writes the request through it; the ``routing.upstream``
connection streams the response back through :meth:`Client.send` and reports its end with
:meth:`Client.done`. Connect failures and stale pooled connections are retried while the request
can be replayed. Pipelined requests wait in ``pending`` and are answered in order.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import TYPE_CHECKING

from shipyard.routing import http1
from shipyard.routing import metrics as routing_metrics
from shipyard.routing.batching import BatchedConnection
from shipyard.routing.http1 import (
    MAX_HEAD,
    BadFraming,
    BodyTooLarge,
    ChunkedScanner,
    MalformedMessage,
    local_response,
    parse_request_head,
)

if TYPE_CHECKING:
    from shipyard.routing.context import ProxyContext
    from shipyard.routing.pool import Pool
    from shipyard.routing.table import Route
    from shipyard.routing.upstream import Upstream

__all__ = ["BUFFER_LIMIT", "MAX_ATTEMPTS", "TRANSITIONS", "Client", "RequestPhase"]

# Bound by assignment, not imported by name: CPython 3.11 compiles ``name.get(...)`` on a name that
# came from ``from ... import`` as an attribute load plus a call, which creates a bound method on
# every request (about 450 machine instructions each, measured with cachegrind), where an assigned
# global gets LOAD_METHOD.
_request_cache = http1.request_cache

# The router's log lines keep the name they had when it was one module.
log = logging.getLogger("shipyard.routing.proxy")

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

_CLOSE = b"connection: close\r\n"

_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))
#: Methods whose request content has no generally defined meaning (RFC 9110 section 9.3): an app
#: may answer without reading it, leaving it on the connection as the start of the next request
#: (a CL.0 desync). After such a request with a body, its upstream connection is never reused.
_BODY_MAY_BE_IGNORED = frozenset((b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT"))

#: Refused past a connection cap, and the answer to a head or body that came too slowly (built
#: here: ``http1.local_response`` knows only the statuses a routed request can get).
_OVER_CAPACITY = local_response(503, b"too many connections\n", b"", False, False)
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 18\r\nconnection: close\r\n\r\nrequest timed out\n"
)
#: A connection the router ends with its own answer (503 past a cap, 408 for a slow client) has
#: the answer sent, its write side shut, and whatever the client still sends read and dropped for
#: this long before it is closed: closing a socket with unread bytes sends a reset, which can
#: destroy the answer before the client reads it (nginx's lingering close).
LINGER = 1.0


def _abort_unless_closed(transport: asyncio.Transport) -> None:
    """End a lingering close (the client may have closed the connection already)."""
    if not transport.is_closing():
        transport.abort()


class RequestPhase(enum.Enum):
    """Where a client connection is with its current request (h11 keeps such a state per peer).

    ::

        IDLE ─head─▶ BUFFERING_BODY ─body complete─▶ AWAITING_RESPONSE ─response done─▶ IDLE
          │               └─too big to hold─▶ STREAMING_BODY ─body complete─┘      │
          ├─head, whole request in hand──────────────────────▶ AWAITING_RESPONSE   ├─101─▶ TUNNEL
          └─head, Expect or a large body─▶ STREAMING_BODY                          │
        any ─error, close, reset, or the response ends the connection─▶ CLOSED ◀───┘

    A 101 may also come while the body still streams (STREAMING_BODY to TUNNEL); a response that
    ends before the body did closes the connection (the rest of the body cannot be told from the
    next request). :data:`TRANSITIONS` lists every allowed step;
    ``tests/routing/test_client.py`` holds the connection to it.
    """

    IDLE = "idle"  # waiting for a request head
    BUFFERING_BODY = "buffering body"  # head parsed; a small body is held so it can be retried
    STREAMING_BODY = "streaming body"  # routed; the rest of the body passes through as it comes
    AWAITING_RESPONSE = "awaiting response"  # request complete; response awaited or relayed
    TUNNEL = "tunnel"  # after 101 Switching Protocols: bytes pass both ways unparsed
    CLOSED = "closed"


# The hot path compares phases by identity against these module globals: looking a member up on
# the Enum class costs about 150 ns on CPython 3.11, a module global about 30.
IDLE = RequestPhase.IDLE
BUFFERING_BODY = RequestPhase.BUFFERING_BODY
STREAMING_BODY = RequestPhase.STREAMING_BODY
AWAITING_RESPONSE = RequestPhase.AWAITING_RESPONSE
TUNNEL = RequestPhase.TUNNEL
CLOSED = RequestPhase.CLOSED

#: Every phase change a client connection may make.
TRANSITIONS: dict[RequestPhase, frozenset[RequestPhase]] = {
    IDLE: frozenset((BUFFERING_BODY, STREAMING_BODY, AWAITING_RESPONSE, CLOSED)),
    BUFFERING_BODY: frozenset((STREAMING_BODY, AWAITING_RESPONSE, CLOSED)),
    STREAMING_BODY: frozenset((AWAITING_RESPONSE, TUNNEL, CLOSED)),
    AWAITING_RESPONSE: frozenset((IDLE, TUNNEL, CLOSED)),
    TUNNEL: frozenset((CLOSED,)),
    CLOSED: frozenset(),
}

# Why reading from a client is paused (bit flags; both may hold at once).
PAUSE_PIPELINE = 1  # too many pipelined bytes wait behind the request in flight
PAUSE_UPSTREAM = 2  # the upstream (or the connect) cannot take the streamed body any faster


class Client(BatchedConnection):
    """One client connection: parses requests in order, routes each, relays the response."""

    __slots__ = (
        "attempts",
        "body_left",
        "chunks",
        "counters",
        "ctx",
        "eof",
        "failed",
        "feeding",
        "fresh_head",
        "fwd",
        "gen",
        "head_len",
        "header",
        "home",
        "idle_ticks",
        "is_head",
        "keep",
        "key",
        "last_forward",
        "last_parsed",
        "method",
        "peer",
        "pending",
        "phase",
        "read_paused",
        "req",
        "route",
        "scan_pos",
        "sent_any",
        "served",
        "shared",
        "started",
        "stream_buf",
        "streaming",
        "t0",
        "tail",
        "ticks",
        "upstream",
        "with_body",
        "write_paused",
    )

    def __init__(self, ctx: ProxyContext) -> None:
        super().__init__(ctx.batcher)
        #: Whether requests pick their service per head (``routing.entry``'s shared listener):
        #: then ``route_head`` runs after each head is parsed. A slot, not a class attribute:
        #: CPython 3.11 specialises a slot load (cachegrind, bench_router's instruction count:
        #: a service's own port costs 68 instructions per request more than before the shared
        #: listener, 0.2%; with a class attribute it was 197).
        self.shared = False
        #: The service context requests are routed in (table, pools, counters, body limit);
        #: a shared listener's connection switches it per request (``route_head``).
        self.ctx = ctx
        #: The context that accounts for the connection itself: its client set, connection
        #: caps, timeout sweep and write batcher. The same as ``ctx`` on a service's listener.
        self.home = ctx
        #: What the router adds to heads forwarded for this client (Via, X-Forwarded-*).
        self.fwd = ctx.forwarding
        self.phase = IDLE
        #: Bytes received and not yet handled: a partial head, a body being buffered, or
        #: pipelined requests waiting behind the one in flight.
        self.pending = bytearray()
        # What follows is not the phase but facts beside it.
        self.feeding = False  # _feed is on the stack (done() must not re-enter it)
        self.eof = False  # the client half-closed (it may still get the answer it asked for)
        self.read_paused = 0  # PAUSE_* flags
        self.write_paused = False  # the client's socket buffer is full: the upstream waits
        self.keep = True  # the connection stays open after this exchange
        self.is_head = False
        self.method = b"GET"
        self.key: bytes | None = None  # sticky key of the current request
        #: The whole current request when it was buffered (it can be sent again); None when
        #: its body is streamed.
        self.req: bytes | None = None
        self.streaming = False  # the current request's body is streamed, not buffered
        self.stream_buf = bytearray()  # streamed bytes held while the upstream connects
        self.sent_any = False  # some of the streamed request reached an upstream: no retry
        self.body_left = 0
        self.head_len = 0
        self.scan_pos = 0
        self.chunks: ChunkedScanner | None = None
        self.route: Route[Pool] | None = None
        self.header = b""
        self.counters: routing_metrics.RevisionCounters | None = None
        self.t0 = 0.0
        self.upstream: Upstream | None = None
        self.attempts = 0
        self.failed: set[Pool] | None = None
        self.gen = 0  # exchange number: a connect finishing for an older exchange is not ours
        self.idle_ticks = 0
        self.started = False  # the client has received part of the answer: errors must cut it
        #: Sweep ticks without progress in the current phase (the client's side; ``idle_ticks``
        #: counts the upstream's silence).
        self.ticks = 0
        #: The head being awaited is the connection's first, or its first byte was seen: the
        #: head timeout runs (otherwise the keep-alive timeout does).
        self.fresh_head = True
        #: An exchange has completed on this connection: from now on its requests may use a
        #: pooled upstream connection (HAProxy's ``http-reuse safe``).
        self.served = False
        #: The current request has a body (see ``body_consumed``).
        self.with_body = False
        self.peer = b"unknown"  # the client's address, as X-Forwarded-For gives it
        #: What ends every head forwarded for this client (Via, X-Forwarded-*, the blank line).
        self.tail = self.fwd.tail(self.peer)
        self.last_parsed: http1.RequestHead | None = None
        self.last_forward = b""

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ctx = self.home
        budget = ctx.budget
        if len(ctx.clients) >= ctx.limits.max_connections or budget.open >= budget.limit:
            self._refuse()
            return
        budget.open += 1
        ctx.clients.add(self)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = str(peer[0]).encode()
            self.tail = self.fwd.tail(self.peer)

    def _refuse(self) -> None:
        """Past this service's or the agent's connection cap: a 503 at once, then close."""
        ctx = self.home
        ctx.refused += 1
        if ctx.budget.open >= ctx.budget.limit:
            ctx.budget.refused += 1
        self.transport.write(_OVER_CAPACITY)
        self.linger_close()

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase is IDLE:
            if self.pending:
                self.pending += data
                data = bytes(self.pending)
                self.pending.clear()
            self._feed(data)
        elif phase is STREAMING_BODY:
            self._stream_body(data)
        elif phase is AWAITING_RESPONSE:
            self.pending += data
            if len(self.pending) > _PIPELINE_LIMIT:
                self.pause(PAUSE_PIPELINE)
        elif phase is BUFFERING_BODY:
            self.ticks = 0
            self.pending += data
            self._buffer_more()
        elif phase is TUNNEL and self.upstream is not None:
            self.upstream.send(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        up = self.upstream
        if self.phase is TUNNEL and up is not None:
            if up.out is not None:
                up.transport.write(up.out)
                up.out = None
            if up.transport.can_write_eof():
                up.transport.write_eof()
            return True
        # A client may half-close after its last request: still answer what was asked in full.
        return True if self.phase is AWAITING_RESPONSE else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = CLOSED
        clients = self.home.clients
        if self in clients:  # (a refused connection was never counted)
            clients.remove(self)
            self.home.budget.open -= 1
        self.gen += 1
        up = self.upstream
        self.upstream = None
        if up is not None:
            up.client = None
            up.abort_transport()
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
        self.feeding = True
        try:
            while data:
                if self.phase is not IDLE:
                    if self.phase is not CLOSED:
                        self.pending += data
                        if len(self.pending) > _PIPELINE_LIMIT:
                            self.pause(PAUSE_PIPELINE)
                    return
                end = data.find(b"\r\n\r\n")
                if end < 0:
                    if data[:1] == b"\r" or data[:1] == b"\n":
                        data = data.lstrip(b"\r\n")  # stray CRLF after a body: ignored (RFC 9112)
                        continue
                    if len(data) > MAX_HEAD:
                        self._reject(431, b"request head too large\n")
                    elif self.eof:
                        self.close()
                    else:
                        self.pending += data
                    return
                hend = end + 4
                if hend > MAX_HEAD:
                    self._reject(431, b"request head too large\n")
                    return
                head = data if hend == len(data) else data[:hend]
                parsed = _request_cache.get(head)  # inlined from parse_request_head: hot path
                if parsed is None:
                    try:
                        parsed = parse_request_head(head)
                    except MalformedMessage as exc:
                        if data[:1] == b"\r" or data[:1] == b"\n":
                            data = data.lstrip(b"\r\n")
                            continue
                        self._reject(exc.status, exc.reason)
                        return
                if self.shared and not self.route_head(head):
                    return  # answered by the router itself (unknown host, redirect), closed
                # the head the upstream gets (http1.parse_request_head says what changes), kept
                # for the next request: keep-alive clients repeat their head, and the cached
                # parse is the same object then (saves the concatenation, ~300 instructions)
                if parsed is self.last_parsed:
                    method, keep, length, te, expect, _, _ = parsed
                    fwd = self.last_forward
                else:
                    method, keep, length, te, expect, fwd, prior = parsed
                    if prior is None:
                        fwd += self.tail
                    else:  # the client sent X-Forwarded-* of its own
                        fwd += self.fwd.tail(self.peer, prior)
                    self.last_parsed = parsed
                    self.last_forward = fwd
                self.keep = keep
                self.is_head = method == b"HEAD"
                self.method = method
                table = self.ctx.table
                self.key = table.sticky_key(head) if table.sticky is not None else None
                if te is not None:
                    self.with_body = True
                    chunks = ChunkedScanner(self.ctx.max_body)
                    try:
                        body_end = chunks.scan(data, hend)
                    except BodyTooLarge:
                        self._reject(413, b"request body too large\n")
                        return
                    except BadFraming:
                        self._reject(400, b"malformed chunked body\n")
                        return
                    if body_end >= 0:
                        self._dispatch(fwd + data[hend:body_end])
                        data = data[body_end:]
                        continue
                    self.chunks = chunks
                    if expect or len(data) - hend > BUFFER_LIMIT:
                        self._dispatch_stream(fwd + data[hend:])
                        return
                    self.phase = BUFFERING_BODY
                    self.head_len = len(fwd)
                    self.pending += fwd
                    self.pending += data[hend:]
                    self.scan_pos = len(self.pending)
                    return
                if length > 0:
                    self.with_body = True
                    if length > self.ctx.max_body:
                        self._reject(413, b"request body too large\n")
                        return
                    total = hend + length
                    if len(data) >= total:
                        self._dispatch(fwd + data[hend:total])
                        data = data[total:]
                        continue
                    self.chunks = None
                    if expect or length > BUFFER_LIMIT:
                        self.body_left = total - len(data)
                        self._dispatch_stream(fwd + data[hend:])
                        return
                    self.phase = BUFFERING_BODY
                    self.body_left = len(fwd) + length
                    self.pending += fwd
                    self.pending += data[hend:]
                    return
                self._dispatch(fwd)
                data = data[hend:] if hend != len(data) else b""
        finally:
            self.feeding = False

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
        self.feeding = True
        try:
            self._dispatch(data[:end])
        finally:
            self.feeding = False
        if end < len(data):
            self._feed(data[end:])
        elif self.phase is IDLE and self.eof:
            self.close()

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
        self.phase = AWAITING_RESPONSE
        if end < len(data):
            self.pending += data[end:]

    def _send_body(self, body: bytes) -> None:
        up = self.upstream
        self.idle_ticks = 0
        self.ticks = 0
        if up is not None:
            up.send(body)
        else:  # still connecting
            self.stream_buf += body
            if len(self.stream_buf) > _STREAM_HOLD:
                self.pause(PAUSE_UPSTREAM)

    def _body_error(self, status: int, body: bytes) -> None:
        self._drop_upstream()
        if self.started:
            self.keep = False
            self.abort_transport()
            self.done(status)
        else:
            self._local(status, body, close=True)

    # -- routing ----------------------------------------------------------------------------

    def _dispatch(self, req: bytes) -> None:
        """Route a fully received request (head and body in ``req``); retryable."""
        self.req = req
        self.streaming = False
        self.phase = AWAITING_RESPONSE
        self._start()

    def _dispatch_stream(self, data: bytes) -> None:
        """Route a request whose body is still arriving; ``data`` is its head and body so far."""
        self.req = None
        self.streaming = True
        self.sent_any = False
        self.stream_buf += data
        self.phase = STREAMING_BODY
        self._start()

    def _start(self) -> None:
        route = self.ctx.table.pick(self.key)
        self.started = False
        if route is None:
            self.route = None
            self.ctx.unrouted += 1
            self._local(503, b"no backend is serving this service\n")
            return
        self.route = route
        # the client's Connection is not forwarded, so the upstream cannot say close for it
        self.header = route.crlf_header if self.keep else route.crlf_header + _CLOSE
        c = self.counters = route.counters
        c.inflight += 1
        self.t0 = _now()
        self.attempts = 1
        self.idle_ticks = 0
        pool = route.next_pool()
        idle = pool.idle
        # The hot path: a pooled connection, a whole request, not the connection's first one.
        # A client's first request always gets a connection of its own (HAProxy's "http-reuse
        # safe"): whatever another client may have left on a pooled connection never reaches it,
        # and a pooled connection the backend closed meanwhile never costs a first request.
        if idle and self.served and not self.streaming:
            up = idle.pop()  # most recently used first: least likely to have been closed
            transport = up.transport
            if not transport.is_closing():
                self.upstream = up
                up.client = self  # (a pooled upstream already awaits a response head)
                if self.write_paused:
                    transport.pause_reading()
                up.send(self.req)  # type: ignore[arg-type]
                return
        self._use_pool(pool, fresh=not self.served)

    def _use_pool(self, pool: Pool, *, fresh: bool) -> None:
        if not fresh:
            up = pool.take_idle()
            if up is not None:
                self.attach(up)
                return
        pool.open(self.ctx, self, self.gen)

    def route_head(self, head: bytes) -> bool:
        """Pick the service for the request ``head`` (parsed and accepted) before it is routed;
        False when the router answered it itself and closed. Only called when ``shared``:
        ``routing.entry.EntryClient`` implements it."""
        raise NotImplementedError("only a shared listener's connection routes by head")

    def waiting_for(self, gen: int) -> bool:
        """Whether exchange number ``gen`` still waits for its upstream connection."""
        return self.gen == gen and self.phase is not CLOSED

    def attach(self, up: Upstream) -> None:
        self.upstream = up
        up.client = self
        self.idle_ticks = 0
        if self.write_paused:
            up.transport.pause_reading()
        if self.streaming:
            self.sent_any = True
            if self.stream_buf:
                up.send(bytes(self.stream_buf))
                self.stream_buf.clear()
            self.resume(PAUSE_UPSTREAM)
        else:
            assert self.req is not None
            up.send(self.req)

    def connect_failed(self, pool: Pool, exc: BaseException) -> None:
        backend = pool.backend
        log.info(
            "cannot connect to %s (%s:%s): %r", backend.replica_id, backend.host, backend.port, exc
        )
        pool.mark_down()
        if self.failed is None:
            self.failed = set()
        self.failed.add(pool)
        self._retry(pool, elsewhere=True)

    def upstream_lost(self, up: Upstream, exc: BaseException | None) -> None:
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

    def _retry(self, pool: Pool, *, elsewhere: bool) -> None:
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

    def _alternative(self) -> Pool | None:
        """Another backend for a retry: same revision first, then any routed revision."""
        failed = self.failed or set()
        table = self.ctx.table
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

    def _move(self, route: Route[Pool]) -> None:
        old = self.counters
        if old is not None:
            self._leave(old)
        self.route = route
        # the client's Connection is not forwarded, so the upstream cannot say close for it
        self.header = route.crlf_header if self.keep else route.crlf_header + _CLOSE
        c = self.counters = route.counters
        c.inflight += 1

    def _drop_upstream(self) -> None:
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.client = None
            up.abort_transport()

    def tunnel(self, up: Upstream) -> None:
        """101 Switching Protocols: the request is answered; relay raw bytes from now on."""
        c = self.counters
        if c is not None:
            self.counters = None
            c.requests += 1
            self._leave(c)
        self.phase = TUNNEL
        if self.pending:
            up.send(bytes(self.pending))
            self.pending.clear()
        self.resume(PAUSE_PIPELINE)

    def tick(self) -> None:
        """One tick of the proxy's timeout sweep (``ProxyContext`` holds the limits in ticks).

        - IDLE: a head under way (the connection's first, or one whose first byte has come)
          must be whole within the head timeout, however slowly its bytes trickle in
          (slowloris): else 408 and close. With nothing received, the connection is closed
          silently after the head timeout (a new connection) or the keep-alive timeout.
        - BUFFERING_BODY, STREAMING_BODY: a body making no progress for the body timeout: 408
          (while the upstream holds the client back, that is the upstream's silence instead).
        - AWAITING_RESPONSE: 504 once the upstream has been silent for the response timeout
          (a client too slow to take the response pauses the upstream: that does not count).
        """
        phase = self.phase
        ctx = self.home
        if phase is IDLE:
            self.ticks += 1
            if self.pending:
                if not self.fresh_head:  # the next head's first byte came since the last tick
                    self.fresh_head = True
                    self.ticks = 1
                if self.ticks > ctx.head_ticks:
                    self._request_timeout()
            elif self.ticks > (ctx.head_ticks if self.fresh_head else ctx.keepalive_ticks):
                ctx.idle_closed += 1
                self.close()
            return
        if phase is BUFFERING_BODY or (phase is STREAMING_BODY and not self.read_paused):
            self.ticks += 1
            if self.ticks > ctx.body_ticks:
                self._request_timeout()
            return
        if self.upstream is not None and self.counters is not None and not self.write_paused:
            self.idle_ticks += 1
            if self.idle_ticks > ctx.response_ticks:
                self.timeout()

    def _request_timeout(self) -> None:
        """The client was too slow sending its request head or body: 408, and close."""
        self.home.slow_clients += 1
        if self.phase is STREAMING_BODY:  # routed: end the exchange so it is counted
            self._drop_upstream()
            self.keep = False
            if self.started:  # part of an answer went out: a 408 cannot follow it
                self.abort_transport()
            else:
                self.send(_REQUEST_TIMEOUT)
                self.started = True
            self.done(408)  # (closes: the phase is STREAMING_BODY)
        else:  # the client may still be sending its head: a plain close could reset the 408
            self.send(_REQUEST_TIMEOUT)
            self.linger_close()

    def timeout(self) -> None:
        self._drop_upstream()
        if self.started:
            self.upstream_broken()
        else:
            self._local(504, b"upstream did not answer in time\n", upstream_error=True)

    def upstream_broken(self) -> None:
        """The upstream failed after the request was sent (bad response, reset midway)."""
        self.upstream = None
        if self.started:  # the client has part of a response: cut it off visibly
            self.keep = False
            self.abort_transport()
            self.done(502, upstream_error=True)
        else:
            self._local(502, b"upstream failed\n", upstream_error=True)

    # -- responses and bookkeeping ----------------------------------------------------------

    def _local(
        self, status: int, body: bytes, *, close: bool = False, upstream_error: bool = False
    ) -> None:
        """Answer the current request from the router itself."""
        self._drop_upstream()
        keep = self.keep and self.phase is not STREAMING_BODY and not close
        route = self.route
        self.send(local_response(status, body, route.header if route else b"", keep, self.is_head))
        self.keep = keep
        self.started = True
        self.done(status, upstream_error)

    def _reject(self, status: int, body: bytes) -> None:
        """Answer a request that cannot be routed (malformed, too large) and close."""
        self.send(local_response(status, body, b"", False, False))
        self.close()

    def done(self, status: int, upstream_error: bool = False) -> None:
        """The current exchange is over: count it, then go on with the next request or close."""
        c = self.counters
        if c is not None:
            self.counters = None
            c.observe(status, _now() - self.t0)
            if upstream_error:
                c.upstream_errors += 1
            c.inflight -= 1
            if not c.inflight and self.ctx.drain_waiters:
                self.ctx.wake(c.revision)
        self.upstream = None
        self.req = None
        self.gen += 1
        if self.failed is not None:
            self.failed = None
        if self.stream_buf:
            self.stream_buf.clear()
        self.with_body = False
        phase = self.phase
        if phase is CLOSED:
            return
        if not self.keep or phase is STREAMING_BODY:
            self.close()
            return
        self.phase = IDLE
        self.served = True
        self.ticks = 0
        self.fresh_head = False
        if self.read_paused:
            self.resume(PAUSE_PIPELINE)
        if self.feeding:
            return  # _feed is on the stack and goes on with the next request
        if self.pending:
            data = bytes(self.pending)
            self.pending.clear()
            self._feed(data)
        elif self.eof:
            self.close()

    def body_consumed(self, up: Upstream) -> bool:
        """Whether the upstream surely read all of this request's body, so its connection can
        carry another request. Called by ``routing.upstream`` when the response is complete,
        for requests with a body only.

        No when a method whose body an app may ignore carried one (the router cannot know the
        app read it), or when the body was not all written yet (the app answered without
        reading it). Either way the rest of the body would be read as the next request on that
        connection: another client's request hijacked (a CL.0 desync).
        """
        return (
            self.method not in _BODY_MAY_BE_IGNORED
            and up.out is None
            and not up.transport.get_write_buffer_size()
        )

    def _leave(self, c: routing_metrics.RevisionCounters) -> None:
        c.inflight -= 1
        if not c.inflight and self.ctx.drain_waiters:
            self.ctx.wake(c.revision)

    def close(self) -> None:
        self.phase = CLOSED
        self.close_transport()

    def linger_close(self) -> None:
        """Close after the router's own final answer: send what is queued, shut the write side,
        and drop what the client still sends for ``LINGER`` seconds before closing."""
        self.phase = CLOSED  # whatever arrives is dropped
        transport = self.transport
        out, self.out = self.out, None
        if out is not None and not transport.is_closing():
            transport.write(out)
        if transport.can_write_eof():
            if self.read_paused:  # unread bytes would make the final close a reset
                self.read_paused = 0
                transport.resume_reading()
            transport.write_eof()
            self.home.loop.call_later(LINGER, _abort_unless_closed, transport)
        else:
            transport.close()

    def pause(self, why: int) -> None:
        if not self.read_paused and self.phase is not CLOSED:
            self.transport.pause_reading()
        self.read_paused |= why

    def resume(self, why: int) -> None:
        if self.read_paused & why:
            self.read_paused &= ~why
            if not self.read_paused and self.phase is not CLOSED:
                self.transport.resume_reading()
