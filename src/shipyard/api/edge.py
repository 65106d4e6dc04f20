"""The API server's edge: how ``shipyard serve`` runs uvicorn so that hostile clients are refused
before authentication, and optional TLS. Called by ``cli/main.py``'s ``serve``; tests start
``server_config`` on port 0 and talk to it over raw sockets.

What it sets, and why this way (HAProxy's and nginx's defaults are the anchors):

- **Head size** (``Settings.max_head_bytes``, 16 KiB like h11's default and HAProxy's
  ``tune.bufsize``): the h11 protocol, whose ``max_incomplete_event_size`` bounds the request line
  and headers together; past it h11 raises and uvicorn answers 400 and closes. uvicorn's
  httptools protocol (its default when httptools is installed) has no such bound: the 10 MB header
  of issue 10 went through it. The API is not throughput-bound, so h11's slower parsing is fine.
- **Header count** (``Settings.max_header_count``): ``api.limits.HeaderCountLimit``, 431 — the
  head is already bounded in bytes, so counting after parsing costs the attacker nothing extra.
- **Request timeout** (``Settings.request_timeout_seconds``, HAProxy's ``timeout http-request``):
  uvicorn has none. ``GuardedH11Protocol`` arms one timer per connection when it starts waiting
  for a request (on accept, or the first byte after a keep-alive pause) and cancels it once the
  whole request — head and body — has arrived. A client dripping one byte every few seconds is
  closed when it fires (408 if part of a head arrived, silently if nothing did, as HAProxy
  does). One timer per connection, not a periodic sweep: ``loop.call_later`` is a heap entry,
  and 1,100 idle sockets cost 1,100 of them. Subclassing the protocol (rather than wrapping the
  transport) is the only place that sees both "bytes arrived" and h11's parse state; the
  subclass touches ``data_received``, ``on_response_complete``, ``connection_made`` and
  ``connection_lost`` only, each calling uvicorn's own first.
- **Keep-alive** (``Settings.keep_alive_timeout_seconds``): uvicorn's ``timeout_keep_alive``.
- **Requests in flight** (``Settings.max_concurrent_requests``): ``api.limits.ConcurrencyLimit``,
  503. Not uvicorn's ``limit_concurrency``, which counts open connections too, so idle sockets
  would make every request a 503.
- **Open connections** (``Settings.max_connections``, HAProxy's ``maxconn``): a connection past
  it is closed on accept, so descriptors are left for the store, the agent and the logs; the
  descriptor limit is raised to the hard maximum at start (``raise_descriptor_limit``) and the
  cap is kept below it.

With TLS, the protocol sees a connection only after the handshake: a client that never
handshakes is closed by asyncio's TLS handshake timeout (60 s), which uvicorn does not expose.
"""

from __future__ import annotations

import asyncio
import resource
import ssl
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from shipyard.errors import InvalidInput
from shipyard.settings import Settings

#: Descriptors kept free of client connections: SQLite, the agent's sockets, log files, builds.
DESCRIPTOR_RESERVE = 256

_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 27\r\nconnection: close\r\n\r\nrequest not sent in time.\r\n"
)


class EdgeConfig(uvicorn.Config):
    """uvicorn's configuration plus what ``GuardedH11Protocol`` reads from it."""

    def __init__(
        self, app: Any, *, request_timeout: float, max_connections: int, **kw: Any
    ) -> None:
        super().__init__(app, **kw)
        self.request_timeout = request_timeout
        self.max_connections = max_connections


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a whole-request deadline and a connection cap (see the module
    docstring for why here)."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kw: Any) -> None:
        super().__init__(config, *args, **kw)
        if not isinstance(config, EdgeConfig):
            raise TypeError("GuardedH11Protocol needs an EdgeConfig")
        self._request_timeout = config.request_timeout
        self._max_connections = config.max_connections
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._max_connections:
            transport.close()  # cheaper than any answer; the client may retry
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first byte of a request after a keep-alive pause
        super().data_received(data)
        self._settle()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may parse a pipelined request already buffered
        self._settle()
        if (
            self._deadline is None
            and self.conn.their_state is h11.IDLE
            and self.conn.trailing_data[0]
        ):
            self._arm()

    def _settle(self) -> None:
        """Cancel the deadline once the client has sent its whole request (or broke the
        protocol, which uvicorn already answers with 400 and a close)."""
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self._request_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        started_head = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        if started_head and self.conn.our_state is h11.IDLE:
            self.transport.write(_TIMED_OUT)
        self.transport.close()


def raise_descriptor_limit() -> int:
    """Raise this process's open-file limit to its hard maximum (children, such as the agent
    ``serve`` starts, inherit it); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # keep what we have; the connection cap is sized from it below
    return soft


def connection_cap(settings: Settings, descriptor_limit: int) -> int:
    """``settings.max_connections``, kept ``DESCRIPTOR_RESERVE`` below the descriptor limit."""
    return max(1, min(settings.max_connections, descriptor_limit - DESCRIPTOR_RESERVE))


def check_tls(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The server's TLS context from ``--tls-cert``/``--tls-key``, or None for plain HTTP.
    Raises InvalidInput saying what to fix when only one is given, a file cannot be read, or
    the key does not belong to the certificate — before anything binds a port."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise InvalidInput("--tls-cert and --tls-key go together: pass both, or neither")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            path.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"{flag} {path}: cannot read it ({exc.strerror})") from exc
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        why = (
            "the key does not belong to the certificate"
            if "KEY_VALUES_MISMATCH" in str(exc)
            else f"not a PEM certificate and matching unencrypted private key ({exc.reason})"
        )
        raise InvalidInput(f"--tls-cert {cert} / --tls-key {key}: {why}") from exc
    return context


def server_config(
    app: Any, settings: Settings, host: str, port: int, *, descriptor_limit: int | None = None
) -> EdgeConfig:
    """uvicorn's configuration for the API with every edge limit of ``settings`` applied."""
    tls = check_tls(settings.tls_cert, settings.tls_key)
    limit = descriptor_limit or resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return EdgeConfig(
        app,
        host=host,
        port=port,
        http=GuardedH11Protocol,
        h11_max_incomplete_event_size=settings.max_head_bytes,
        timeout_keep_alive=settings.keep_alive_timeout_seconds,
        request_timeout=settings.request_timeout_seconds,
        max_connections=connection_cap(settings, limit),
        ws="none",
        lifespan="on",
        log_level="warning",
        access_log=False,
        ssl_context_factory=(lambda _config, _default: tls) if tls is not None else None,
    )
