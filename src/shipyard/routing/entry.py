"""The shared entry point: one listener (HTTP, or HTTPS with SNI) in front of many services.

``agent.server`` starts up to two :class:`EntryListener` s (``shipyard agent --http-listen``,
``--https-listen``) beside the per-service listeners of ``routing.proxy``, and calls
:meth:`EntryListener.configure` with every service's host rules (``[service] hosts``) whenever
they change. Each request is routed by its ``Host`` (and path prefix, ``routing.hosts``) to the
routing context (``ProxyContext``) of the service that claims it; from there on it is that
service's request exactly as if it had come to the service's own port: its table, pools,
per-revision counters (canary analysis sees it), body limit and retries.

How a connection picks its service without slowing the per-service path: an
:class:`EntryClient` is a ``routing.client.Client`` whose ``shared`` slot is True, so
``Client._feed`` calls :meth:`EntryClient.route_head` after each head is parsed (a service's own
listener pays one slot load per request for that check). ``route_head`` asks the
host table (one dictionary lookup per distinct head, cached with the table) and, when the
service differs from the previous request's, points the connection's ``ctx`` at it and
recomputes the forwarded tail (``X-Forwarded-Proto: https`` on TLS). The connection itself
belongs to the listener's own context (``Client.home``): its timeouts (the agent's limits), the
agent-wide ``ConnectionBudget``, the timeout sweep, the write batcher.

What the router answers itself: ``404`` for a host (or path) no service claims, never another
service's app; ``421 Misdirected Request`` on TLS when the ``Host`` is not the name the
handshake was made for (SNI), so one certificate's connection cannot reach another host's
service; ``308`` to ``https://`` on the HTTP listener for a service with ``https_redirect``.
HSTS (``Strict-Transport-Security``) is added to a service's responses on HTTPS when it asks
for it (``hsts_max_age``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from shipyard.routing.certificates import SNI_ATTRIBUTE, CertificateSource, server_context
from shipyard.routing.client import Client
from shipyard.routing.context import ProxyContext
from shipyard.routing.hosts import HostRule, HostTable
from shipyard.routing.http1 import Forwarding
from shipyard.routing.limits import ConnectionBudget, RouterLimits

if TYPE_CHECKING:
    from shipyard.routing.pool import Pool
    from shipyard.routing.table import Route

__all__ = ["EntryClient", "EntryListener", "ServiceEntry", "check_hosts"]

log = logging.getLogger("shipyard.routing.entry")

_UNKNOWN_HOST = b"no service on this listener serves this host\n"
_MISDIRECTED = b"the Host header names another host than this TLS connection was made for\n"


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """What a shared listener needs of one service: where its requests go and its options."""

    service: str
    #: The service's routing context (``ServiceProxy.context``).
    ctx: ProxyContext
    hosts: tuple[HostRule, ...]
    #: On the HTTP listener: answer 308 to the same URL on https instead of serving.
    https_redirect: bool = False
    #: On the HTTPS listener: ``Strict-Transport-Security: max-age=N`` on its responses (0: no).
    hsts_max_age: int = 0


@dataclass(frozen=True, slots=True, eq=False)
class _Target:
    """One service as one listener serves it (its forwarding already says the scheme)."""

    service: str
    ctx: ProxyContext
    forwarding: Forwarding
    redirect: bool
    #: Added after ``x-shipyard-revision`` to each response (HSTS), or b"".
    extra_header: bytes


def check_hosts(claims: Mapping[str, Sequence[HostRule]]) -> None:
    """ValueError if two services (service -> its rules) claim the same host and path, naming
    both; the check :meth:`EntryListener.configure` makes, for callers that must refuse before
    changing anything."""
    HostTable(claims, {service: service for service in claims})


class EntryListener:
    """A shared listener: accepts connections for every service and routes each request by
    host. Runs on the event loop that called :meth:`start` (not thread-safe)."""

    def __init__(
        self,
        scheme: Literal["http", "https"],
        *,
        limits: RouterLimits | None = None,
        budget: ConnectionBudget | None = None,
        certificates: CertificateSource | None = None,
        https_port: int = 443,
    ) -> None:
        """``certificates``: required for ``https`` (SNI picks one per handshake);
        ``https_port``: where the HTTP listener's redirects point (443: left out of the URL)."""
        if scheme == "https" and certificates is None:
            raise ValueError("an https listener needs a certificate source")
        self.scheme = scheme
        self.https_port = https_port
        limits = limits or RouterLimits()
        budget = budget or ConnectionBudget(limits.max_connections)
        #: The context the listener's connections belong to (caps, timeouts, sweep, batcher);
        #: requests are routed in the services' contexts.
        self.home = ProxyContext(max_body=0, connect_timeout=2.0, limits=limits, budget=budget)
        self._ssl = server_context(certificates) if certificates is not None else None
        self.table: HostTable[_Target] = HostTable({}, {})
        self._server: asyncio.Server | None = None
        self._closed = False

    @property
    def tls(self) -> bool:
        return self._ssl is not None

    def configure(self, services: Sequence[ServiceEntry]) -> None:
        """Route by these services' host rules from now on (the table is replaced whole).
        ValueError when two claim the same host and path: the old table stays."""
        targets: dict[_Target, tuple[HostRule, ...]] = {}
        names: dict[_Target, str] = {}
        https = self.scheme == "https"
        for s in services:
            hsts = b""
            if https and s.hsts_max_age > 0:
                hsts = b"strict-transport-security: max-age=%d\r\n" % s.hsts_max_age
            target = _Target(
                s.service,
                s.ctx,
                dataclasses.replace(s.ctx.forwarding, scheme=self.scheme),
                redirect=not https and s.https_redirect,
                extra_header=hsts,
            )
            targets[target] = s.hosts
            names[target] = s.service
        self.table = HostTable(targets, names)

    def connection_stats(self) -> dict[str, int]:
        """Open connections, and those refused, cut for slowness or closed idle."""
        ctx = self.home
        return {
            "open": len(ctx.clients),
            "refused": ctx.refused,
            "slow_clients": ctx.slow_clients,
            "idle_closed": ctx.idle_closed,
        }

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: any free port); returns the bound port. An OSError
        names the address and the listener."""
        if self._server is not None:
            raise RuntimeError("the entry listener is already started")
        loop = asyncio.get_running_loop()
        home = self.home
        home.bind(loop)
        try:
            server = await loop.create_server(
                lambda: EntryClient(self),
                host,
                port,
                reuse_address=True,
                backlog=1024,
                ssl=self._ssl,
                # a client that never finishes its handshake is cut like a slow head
                ssl_handshake_timeout=home.limits.head_timeout if self._ssl else None,
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"shared {self.scheme} listener cannot listen on {host}:{port}: "
                f"{exc.strerror or exc}; is another process using the port (or is it below "
                "1024 without the privilege to bind it)?",
            ) from exc
        self._server = server
        sweeper = loop.create_task(self._sweep(), name=f"shipyard-entry-{self.scheme}-timeouts")
        home.tasks.add(sweeper)
        sockets = server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def close(self) -> None:
        """Stop listening and cut the open connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        home = self.home
        server = self._server
        if server is not None:
            server.close()
        for task in list(home.tasks):
            task.cancel()
        for client in list(home.clients):
            client.abort_transport()
        if home.tasks:
            await asyncio.gather(*home.tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await server.wait_closed()

    async def _sweep(self) -> None:
        """The timeouts of ``Client.tick`` for this listener's connections (see
        ``ServiceProxy._sweep``: one sweep, not a timer per request)."""
        home = self.home
        while True:
            await asyncio.sleep(home.tick)
            for client in list(home.clients):
                client.tick()


class EntryClient(Client):
    """A connection to a shared listener: picks each request's service by its head."""

    __slots__ = ("listener", "sni", "target")

    def __init__(self, listener: EntryListener) -> None:
        super().__init__(listener.home)
        self.shared = True
        self.listener = listener
        #: The TLS server name the handshake was made for (None on plain HTTP).
        self.sni: bytes | None = None
        #: The service the connection's last request went to.
        self.target: _Target | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.listener.tls:
            sslobj = transport.get_extra_info("ssl_object")
            self.sni = getattr(sslobj, SNI_ATTRIBUTE, None)

    def route_head(self, head: bytes) -> bool:
        table = self.listener.table
        hit = table.cache.get(head)  # inlined from HostTable.resolve: once per request
        target, host = hit if hit is not None else table.resolve(head)
        if target is None:
            self._reject(404, _UNKNOWN_HOST)
            return False
        sni = self.sni
        if sni is not None and sni != host:
            self._reject(421, _MISDIRECTED)
            return False
        if target is not self.target:
            if target.redirect:
                self._redirect(host, head)
                return False
            self.target = target
            self.ctx = target.ctx
            fwd = self.fwd = target.forwarding
            self.tail = fwd.tail(self.peer)
            self.last_parsed = None  # its cached forward head ends with the old tail
        return True

    def _redirect(self, host: bytes, head: bytes) -> None:
        """308 to the same host and target on https (the method and body are kept by the
        client, unlike 301), then close: the body, if any, is not read."""
        port = self.listener.https_port
        target = _target(head)
        authority = host if port == 443 else host + b":%d" % port
        location = b"https://" + authority + target
        self.send(
            b"HTTP/1.1 308 Permanent Redirect\r\nlocation: " + location + b"\r\n"
            b"content-length: 0\r\nconnection: close\r\n\r\n"
        )
        self.close()

    def _start(self) -> None:
        # Client._start(self), not super()._start(): super() builds an object per request
        Client._start(self)
        target = self.target
        if target is not None and target.extra_header and self.route is not None:
            self.header += target.extra_header

    def _move(self, route: Route[Pool]) -> None:
        Client._move(self, route)
        target = self.target
        if target is not None and target.extra_header:
            self.header += target.extra_header


def _target(head: bytes) -> bytes:
    """The request's target as origin-form (path and query) for a redirect's Location."""
    target = head.split(b" ", 2)[1]
    if target[:1] != b"/":  # absolute-form (http1 accepted it): drop scheme and authority
        rest = target.partition(b"://")[2]
        slash = rest.find(b"/")
        query = rest.find(b"?")
        cut = min(i for i in (slash, query, len(rest)) if i >= 0)
        target = rest[cut:]
        if target[:1] != b"/":
            target = b"/" + target
    return target
