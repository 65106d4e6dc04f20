"""Shipyard's traffic router (data plane): one asyncio HTTP/1.1 reverse proxy per service.

The local agent creates one :class:`ServiceProxy` per service, starts it on the service's stable
port, and calls :meth:`ServiceProxy.configure` whenever a rollout changes the revision weights;
:meth:`ServiceProxy.drain` says when an old revision may be stopped, and
:meth:`ServiceProxy.metrics` feeds canary analysis. ``python -m shipyard.routing.proxy`` runs one
standalone (the router benchmark does).

This module is the façade. The router is one concept per module in ``shipyard.routing``:

- ``proxy``: this façade (listener, ``configure``, drains, metrics, timeout sweep, command line);
- ``context``: :class:`~shipyard.routing.context.ProxyContext`, all the connections see of it;
- ``client``: the client protocol, one request phase at a time;
- ``upstream``: the upstream protocol, parsing and relaying the response;
- ``pool``: keep-alive connections per backend, and opening new ones;
- ``limits``: timeouts, connection caps (per service, per process), the descriptor limit;
- ``batching``: writes held and flushed once per event-loop iteration;
- ``table``: the routing table (weighted round-robin, sticky buckets), no sockets;
- ``http1``: HTTP/1.1 heads and chunked framing, no sockets;
- ``metrics``: per-revision counters, and the snapshots canary analysis reads.

Why it looks the way it does: the router's own Python time per request is the budget (the rest is
kernel loopback work), so it is built on asyncio Protocols under uvloop with no task per request.
The request head is validated by one regular expression and rewritten once per distinct head
(results cached): hop-by-hop fields dropped, an absolute-form target made origin-form, then
``Via`` and ``X-Forwarded-*`` appended per client (``routing.http1.Forwarding``); bodies pass
as the raw bytes the client sent. Responses stream back as they arrive, with
``x-shipyard-revision`` inserted after the status line when the service asks for it
(``configure(revision_header=)``; the agent passes the manifest's ``[routing]
revision_header``, off by default). Writes are held and flushed once per
event-loop iteration, so a busy loop wakes its peers once per batch rather than once per request.
Upstream connections are kept alive in per-backend pools (a client's ``Connection: close`` is for
the router and is not forwarded). A ``101 Switching Protocols`` answer turns the connection pair
into a raw tunnel. A client that half-closes after its request still gets the answer (the request
stays in flight until the app answers it). Slow or idle clients are cut by the timeouts of
``routing.limits``, and a client's first request never rides an upstream connection another
client used (HAProxy's ``http-reuse safe``).

Everything here runs on the event loop that called :meth:`ServiceProxy.start`; call its methods
from that loop only (it is not thread-safe).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Literal

from shipyard.routing import metrics as routing_metrics
from shipyard.routing.client import Client
from shipyard.routing.context import ProxyContext
from shipyard.routing.entry import EntryListener
from shipyard.routing.http1 import Forwarding
from shipyard.routing.limits import ConnectionBudget, RouterLimits, raise_descriptor_limit
from shipyard.routing.pool import Pool
from shipyard.routing.table import (
    Backend,
    Route,
    Table,
    effective_weights,
    group_backends,
    validate_sticky_names,
    validate_weights,
)

__all__ = ["Backend", "ConnectionBudget", "RouterLimits", "ServiceProxy", "main"]

#: The connection cap of a router that was given no shared budget (standalone, tests).
DEFAULT_PROCESS_CONNECTIONS = 16384


class ServiceProxy:
    """The router of one service: a listening port, a routing table, pools, metrics."""

    def __init__(
        self,
        service: str,
        *,
        max_body_bytes: int = 10 * 2**20,
        connect_timeout: float = 2.0,
        response_timeout: float | None = None,
        max_idle_per_backend: int = 64,
        limits: RouterLimits | None = None,
        budget: ConnectionBudget | None = None,
        forwarding: Forwarding | None = None,
    ) -> None:
        """``limits``: this service's timeouts and connection cap (``response_timeout``, if
        given, overrides its field); ``budget``: the process-wide connection cap shared with
        the other routers of the process (default: one of this router's own)."""
        self.service = service
        limits = limits or RouterLimits()
        if response_timeout is not None:
            limits = limits.with_overrides({"response_timeout": response_timeout})
        if budget is None:
            budget = ConnectionBudget.for_descriptors(DEFAULT_PROCESS_CONNECTIONS)
        #: All the client connections see of the proxy.
        self._ctx = ProxyContext(
            max_body=max_body_bytes, connect_timeout=connect_timeout, limits=limits, budget=budget
        )
        if forwarding is not None:  # Via / X-Forwarded-* (routing.http1.Forwarding)
            self._ctx.forwarding = forwarding
        self._max_idle = max_idle_per_backend
        self._pools: dict[Backend, Pool] = {}
        #: Backends taken out of the table, by replica id, until drained (``drain_replica``).
        self._retired: dict[str, Pool] = {}
        self._counters: dict[str, routing_metrics.RevisionCounters] = {}
        #: Contexts of connections pinned to one revision (``open_pinned``), by revision.
        self._pinned: dict[str, ProxyContext] = {}
        self._server: asyncio.Server | None = None
        self._closed = False

    @property
    def context(self) -> ProxyContext:
        """What this router's connections share; ``routing.entry``'s shared listeners route
        requests into it (the service's table, pools and counters)."""
        return self._ctx

    @property
    def unrouted(self) -> int:
        """Requests answered 503 because no revision had a backend."""
        return self._ctx.unrouted

    @property
    def limits(self) -> RouterLimits:
        return self._ctx.limits

    @limits.setter
    def limits(self, limits: RouterLimits) -> None:
        """New timeouts and cap, in force from the sweep's next tick."""
        self._ctx.apply_limits(limits)
        for pinned in self._pinned.values():
            pinned.apply_limits(limits)

    def connection_stats(self) -> dict[str, int]:
        """The router's own counters beside the per-revision metrics: open client connections,
        connections refused past this service's or the process's cap (``refused``; those of the
        process cap, every service's together, in ``refused_process_cap``), requests answered
        408 for a slow head or body, idle keep-alive connections closed."""
        ctx = self._ctx
        return {
            "open": len(ctx.clients),
            "max": ctx.limits.max_connections,
            "process_open": ctx.budget.open,
            "process_max": ctx.budget.limit,
            "refused": ctx.refused,
            "refused_process_cap": ctx.budget.refused,
            "slow_clients": ctx.slow_clients,
            "idle_closed": ctx.idle_closed,
            "unrouted": ctx.unrouted,
        }

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on ``host:port`` (0 = any free port); returns the bound port."""
        if self._server is not None:
            raise RuntimeError(f"router for {self.service!r} is already started")
        loop = asyncio.get_running_loop()
        ctx = self._ctx
        ctx.bind(loop)
        server = self._server = await self._listen(host, port)
        sweeper = loop.create_task(self._sweep(), name=f"shipyard-router-{self.service}-timeouts")
        ctx.tasks.add(sweeper)
        return _bound_port(server, port)

    async def move(self, host: str, port: int) -> int:
        """Listen on ``host:port`` instead (a service whose manifest chose another port): the
        new socket first (an OSError leaves the old one listening), then the old one closes.
        Connections already open stay open and finish on the same routing table."""
        if self._server is None or self._closed:
            raise RuntimeError(f"router for {self.service!r} is not running")
        server = await self._listen(host, port)
        old, self._server = self._server, server
        old.close()
        return _bound_port(server, port)

    async def _listen(self, host: str, port: int) -> asyncio.Server:
        ctx = self._ctx
        try:
            return await ctx.loop.create_server(
                lambda: Client(ctx), host, port, reuse_address=True, backlog=1024
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"router for service {self.service!r} cannot listen on {host}:{port}: "
                f"{exc.strerror or exc}; is another process using the port? "
                "Pick another port or stop that process.",
            ) from exc

    def configure(
        self,
        weights: Mapping[str, int],
        backends: Sequence[Backend],
        sticky_header: str | None = None,
        sticky_cookie: str | None = None,
        *,
        revision_header: bool = True,
    ) -> None:
        """Atomically replace the routing table.

        ``revision_header``: add ``x-shipyard-revision`` to the responses. The router can; the
        agent decides per service (``[routing] revision_header``, off unless a manifest asks).

        ``weights`` maps revision -> percent (ints summing to 100; empty or all zero = no
        traffic). A revision with weight but no backend gives its share to the others. Requests
        already routed finish where they are; new ones follow the new table.
        """
        requested = validate_weights(weights)
        validate_sticky_names(sticky_header, sticky_cookie)
        by_revision = group_backends(backends)
        effective = effective_weights(requested, set(by_revision))
        pools: dict[Backend, Pool] = {}
        routes: list[Route[Pool]] = []
        for revision, weight in effective.items():
            counters = self._counters.get(revision)
            if counters is None:
                counters = self._counters[revision] = routing_metrics.RevisionCounters(revision)
            if weight == 0:
                continue
            route_pools = []
            for backend in by_revision[revision]:
                pool = self._pools.get(backend) or Pool(backend, self._max_idle)
                pools[backend] = pool
                route_pools.append(pool)
            routes.append(Route(revision, route_pools, counters, revision_header))
        for backend, pool in self._pools.items():
            if backend not in pools:
                pool.retire()
                self._retired[backend.replica_id] = pool
        for backend in pools:
            self._retired.pop(backend.replica_id, None)
        self._pools = pools
        self._ctx.table = Table(effective, routes, sticky_header, sticky_cookie)
        for revision, pinned in self._pinned.items():
            pinned.table = self._pinned_table(revision)

    # --- connections pinned to one revision (the agent's built-in load, agent/loading.py) ----

    def _pinned_table(self, revision: str) -> Table[Pool]:
        """``revision``'s route alone, or no route (503) while it has no weight or backend:
        a pinned request never falls over to another revision."""
        route = self._ctx.table.by_revision.get(revision)
        return Table({revision: 100}, [route], None, None) if route else Table({}, [], None, None)

    async def open_pinned(self, revision: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A client connection into this router whose every request goes to ``revision``'s
        backends, as long as it is routed (else 503): the agent's load step (agent/loading.py)
        drives a canary with it.

        It is a socket pair handed to the router's own client protocol, so the requests take
        the real path (parsing, limits, pools, per-revision metrics: they count in canary
        analysis) but reach no listener, and nothing outside the process can ask for it. The
        connection counts against the service's and the process's connection caps; 503s it
        gets are not in ``connection_stats``. Its context shares the proxy's connection set,
        tasks and drain waiters, and follows every ``configure`` and limits change.
        """
        if self._server is None or self._closed:
            raise RuntimeError(f"router for {self.service!r} is not running")
        ctx = self._pinned.get(revision)
        if ctx is None:
            ctx = dataclasses.replace(self._ctx, table=self._pinned_table(revision))
            ctx.loop = self._ctx.loop  # not an __init__ field: replace() leaves it unset
            self._pinned[revision] = ctx
        pinned = ctx
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        try:
            await loop.connect_accepted_socket(lambda: Client(pinned), theirs)
            return await asyncio.open_connection(sock=ours)
        except BaseException:
            ours.close()
            theirs.close()
            raise

    def release_pinned(self, revision: str) -> None:
        """Forget ``revision``'s pinned context once its load stopped (its connections, if any
        are left, keep the table they had)."""
        self._pinned.pop(revision, None)

    @property
    def weights(self) -> dict[str, int]:
        """What is routed now: revision -> percent, shares of backend-less revisions moved."""
        return dict(self._ctx.table.weights)

    def sticky_revision(self, key: str | bytes) -> str | None:
        """The revision a request carrying sticky ``key`` goes to now.

        None when no sticky header/cookie is configured or nothing is routed.
        """
        table = self._ctx.table
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
                    waiters = self._ctx.drain_waiters.setdefault(revision, [])
                    waiters.append(fut)
                    try:
                        await fut
                    finally:
                        if fut in waiters:
                            waiters.remove(fut)
                        if not waiters:
                            self._ctx.drain_waiters.pop(revision, None)
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
        ctx = self._ctx
        server = self._server
        if server is not None:
            server.close()
        for task in list(ctx.tasks):
            task.cancel()
        for client in list(ctx.clients):
            client.abort_transport()
        for pool in self._pools.values():
            pool.retire()
        ctx.table = Table({}, [], None, None)
        for waiters in list(ctx.drain_waiters.values()):
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        if ctx.tasks:
            await asyncio.gather(*ctx.tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await server.wait_closed()

    async def _sweep(self) -> None:
        """Enforce the timeouts (``Client.tick``): 408 for a head or body too slow, silent
        close of an idle keep-alive connection, 504 for an upstream too slow to answer.

        One sweep per router rather than a timer per request: arming and cancelling a timer
        on every request would cost more than the request's own Python time (the hot path
        only resets a counter). A timeout fires up to one tick (1/8 of the shortest) late.
        """
        ctx = self._ctx
        while True:
            await asyncio.sleep(ctx.tick)
            for client in list(ctx.clients):
                client.tick()


def _bound_port(server: asyncio.Server, asked: int) -> int:
    sockets = server.sockets
    return int(sockets[0].getsockname()[1]) if sockets else asked


# -- command line (used by bench/bench_router.py) -------------------------------------------------


_DEFAULTS = RouterLimits()


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
    parser.add_argument("--max-connections", type=int, default=_DEFAULTS.max_connections)
    parser.add_argument("--head-timeout", type=float, default=_DEFAULTS.head_timeout)
    parser.add_argument("--keepalive-timeout", type=float, default=_DEFAULTS.keepalive_timeout)
    parser.add_argument("--body-timeout", type=float, default=_DEFAULTS.body_timeout)
    parser.add_argument("--response-timeout", type=float, default=_DEFAULTS.response_timeout)
    entry = parser.add_argument_group(
        "shared listeners", "also serve the service by host name (routing.entry), as the agent's"
    )
    entry.add_argument("--entry-host", action="append", default=[], metavar="HOST[/PREFIX]")
    entry.add_argument("--http-listen", metavar="HOST:PORT")
    entry.add_argument("--https-listen", metavar="HOST:PORT")
    entry.add_argument("--tls-cert-dir", metavar="DIR", help="NAME.pem + NAME.key per host")
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

    try:
        limits = RouterLimits(
            head_timeout=args.head_timeout,
            keepalive_timeout=args.keepalive_timeout,
            body_timeout=args.body_timeout,
            response_timeout=args.response_timeout,
            max_connections=args.max_connections,
        )
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    before, after = raise_descriptor_limit()
    print(f"descriptor limit (RLIMIT_NOFILE) {before} -> {after}", file=sys.stderr, flush=True)

    async def serve() -> None:
        proxy = ServiceProxy(args.service, limits=limits)
        try:
            proxy.configure(weights, backends, args.sticky_header, args.sticky_cookie)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
        bound = await proxy.start(host, port)
        print(f"shipyard router for {args.service!r} listening on {host}:{bound}", flush=True)
        entries = await _start_entries(args, proxy, limits)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            for listener in entries:
                await listener.close()
            await proxy.close()

    uvloop.run(serve())
    return 0


async def _start_entries(
    args: argparse.Namespace, proxy: ServiceProxy, limits: RouterLimits
) -> list[EntryListener]:
    """The shared listeners the command line asks for, routing ``--entry-host`` to ``proxy``."""
    from pathlib import Path

    from shipyard.domain.hostnames import parse_host_rule
    from shipyard.routing.certificates import DirectoryCertificates
    from shipyard.routing.entry import EntryListener, ServiceEntry

    try:
        rules = tuple(parse_host_rule(h) for h in args.entry_host)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    started: list[EntryListener] = []
    schemes: tuple[tuple[Literal["http", "https"], str | None], ...] = (
        ("https", args.https_listen),
        ("http", args.http_listen),
    )
    for scheme, address in schemes:
        if address is None:
            continue
        if not rules:
            raise SystemExit("--http-listen/--https-listen need at least one --entry-host")
        certificates = None
        if scheme == "https":
            if args.tls_cert_dir is None:
                raise SystemExit("--https-listen needs --tls-cert-dir")
            certificates = DirectoryCertificates(Path(args.tls_cert_dir))
        listener = EntryListener(scheme, limits=limits, certificates=certificates)
        host, port = _split_hostport(address)
        bound = await listener.start(host, port)
        listener.configure([ServiceEntry(args.service, proxy.context, rules)])
        print(f"shared {scheme} listener on {host}:{bound}", flush=True)
        started.append(listener)
    return started


if __name__ == "__main__":
    raise SystemExit(main())
