"""``shipyard agent``: the local runtime's long-lived data-plane process, one per region.

It holds the traffic router (one ``ServiceProxy`` listener per service, a stable URL each) and
supervises the app replicas. The control plane (``shipyard serve``) drives it over an
authenticated loopback HTTP API (``agent.api``; bearer token in ``<agent_dir>/agent.token``,
mode 0600); the client is ``runtime.local.LocalRuntime``. The agent keeps serving traffic while
the control plane is down or restarting, and it persists what it runs (``state.json``) so a
restarted agent puts the same services back on the same ports.

Files in ``<data_dir>/agents/<region>/``: ``agent.json`` (pid, api url), ``agent.token``,
``state.json``, ``agent.log``; replica logs under ``logs/<service>/``; each replica's writable
state (HOME, TMPDIR, its overlay's upper layer) under ``run/<replica_id>/``, removed when it
stops, and a previous agent's left-overs removed on ``restore``.

Replicas that exit on their own are restarted by the supervisor (``agent.supervisor``) with a
backoff; each change it reports reconfigures the service's router (a restarted replica comes
back on a new port, and into rotation only if it was routable and has passed its readiness
probe) and rewrites ``state.json``.

It starts only what the control plane signed: every revision it is asked to start, and every
revision it restores, passes ``agent.verify.ArtifactVerifier`` first (the DSSE signature with the
control plane's public key, then the artifact's content digest); a refusal is a 422 problem with
code ``artifact_verification_failed``, which the local runtime raises as
``ArtifactVerificationFailed``. The agent never holds the private key. A joined agent on
another host is given an ``agent.fetching.ArtifactFetcher``: every directory revision is then
first fetched into its own cache (``localise``) and the spec it runs and stores names that copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import signal
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import HTTPException

from shipyard.agent.api import build_app
from shipyard.agent.containers import ContainerNetwork, Engine
from shipyard.agent.fetching import ArtifactFetcher
from shipyard.agent.instance_lock import hold_agent_lock
from shipyard.agent.loading import LoadRun, LoadSpec, LoadStats
from shipyard.agent.processes import kill_orphan_group
from shipyard.agent.replica_logs import LogLimits
from shipyard.agent.supervisor import Isolation, Replica, RestartPolicy, Supervisor
from shipyard.agent.verify import ArtifactVerifier
from shipyard.domain.hostnames import HostRule, parse_host_rule
from shipyard.errors import (
    ArtifactVerificationFailed,
    RevisionStartFailed,
)
from shipyard.logs import SecretMasker
from shipyard.private_files import write_private
from shipyard.routing.certificates import DirectoryCertificates
from shipyard.routing.entry import EntryListener, ServiceEntry, check_hosts
from shipyard.routing.limits import ConnectionBudget, RouterLimits, raise_descriptor_limit
from shipyard.routing.proxy import Backend, ServiceProxy
from shipyard.runtime.base import EntrySpec, RevisionSpec
from shipyard.sandbox import Sandbox, SandboxPolicy
from shipyard.security.signing import KEY_FILE, PUB_FILE
from shipyard.server_stop import stop_server

log = logging.getLogger("shipyard.agent")


def agent_dir(data_dir: Path, region: str) -> Path:
    return data_dir / "agents" / region


def default_trusted_key(data_dir: Path) -> Path:
    """The control plane's public signing key, the one the agent trusts unless told otherwise."""
    return data_dir / "keys" / PUB_FILE


#: The agent-wide cap on client connections across every service's router (lowered at start
#: to what the descriptor limit allows, see ``ConnectionBudget.for_descriptors``).
DEFAULT_MAX_CONNECTIONS = 65536


class ServiceRoute:
    """One service's listener, its desired weights and the port it keeps across restarts."""

    def __init__(self, service: str, proxy: ServiceProxy, port: int) -> None:
        self.service = service
        self.proxy = proxy
        self.port = port
        self.weights: dict[str, int] = {}
        self.sticky_header: str | None = None
        self.sticky_cookie: str | None = None
        #: This service's own router limits (over the agent's defaults), as configured.
        self.limit_overrides: dict[str, float | int] = {}
        #: Its names on the shared listeners, and their options (``[service]`` of the manifest).
        self.hosts: tuple[HostRule, ...] = ()
        self.https_redirect = False
        self.hsts_max_age = 0
        #: ``x-shipyard-revision`` on its responses (``[routing] revision_header``).
        self.revision_header = False

    def entry(self) -> ServiceEntry:
        """This service as the shared listeners route to it."""
        return ServiceEntry(
            self.service,
            self.proxy.context,
            self.hosts,
            https_redirect=self.https_redirect,
            hsts_max_age=self.hsts_max_age,
        )


class Agent:
    def __init__(
        self,
        data_dir: Path,
        region: str,
        listen_host: str = "127.0.0.1",
        *,
        restart: RestartPolicy | None = None,
        isolation: Isolation = "auto",
        sandbox: Sandbox | None = None,
        trusted_key: Path | str | bytes | None = None,
        router_limits: RouterLimits | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        log_limits: LogLimits | None = None,
        http_listen: tuple[str, int] | None = None,
        https_listen: tuple[str, int] | None = None,
        tls_cert_dir: Path | None = None,
        docker_host: str | None = None,
        container_network: ContainerNetwork = "auto",
        fetcher: ArtifactFetcher | None = None,
        port_range: tuple[int, int] | None = None,
        shared_dir: Path | None = None,
    ) -> None:
        """``docker_host``: the Docker Engine image revisions run on (None: the SDK's default,
        ``DOCKER_HOST`` or the local socket; connected in ``restore``), ``container_network``:
        see ``agent.containers``. ``router_limits``: every service router's defaults (a
        service may override them);
        ``max_connections``: client connections across all of them, one cap, so a flooded
        service cannot take the descriptors the others and this agent's API need;
        ``log_limits``: each replica's log size cap and how long stopped replicas' logs stay.
        ``http_listen``, ``https_listen``: the shared listeners routing by host (None: none;
        :meth:`start_entry` binds them); ``tls_cert_dir``: the HTTPS listener's certificates
        (default ``<agent_dir>/certs``, ``routing.certificates.DirectoryCertificates``).
        ``fetcher``: a joined agent's way to its control plane's directory artifacts (None, the
        local agent: the spec's path is on this machine).
        ``port_range``: where services' listeners bind when no port is asked (a joined agent's
        ``--port-range``; None: any free port). ``shared_dir``: the control plane's replicas'
        directory (``serve --shared-dir``), whose keys replica logs never show either."""
        self.region = region
        self.router_limits = router_limits or RouterLimits()
        self.connections = ConnectionBudget.for_descriptors(max_connections)
        self.dir = agent_dir(data_dir, region)
        # It holds the agent's token: no one else may list or replace what is in it.
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.listen_host = listen_host
        self.port_range = port_range
        self.routes: dict[str, ServiceRoute] = {}
        #: The built-in load on a canary during analysis, per service (agent/loading.py).
        self.loads: dict[str, LoadRun] = {}
        self._stopping: set[asyncio.Task[LoadStats]] = set()
        self.http_listen = http_listen
        self.https_listen = https_listen
        self.tls_cert_dir = tls_cert_dir or self.dir / "certs"
        #: The shared listeners by scheme, once started, and the ports they are bound to.
        self.entries: dict[str, EntryListener] = {}
        self.entry_ports: dict[str, int] = {}
        self.token = secrets.token_urlsafe(32)
        mask = SecretMasker.from_data_dir(data_dir, self.token.encode(), shared_dir=shared_dir)
        #: Containers carry this agent's directory as their ``agent`` label: its own, on an
        #: engine other agents (other data directories) may share.
        self.engine = Engine(docker_host, agent_id=str(self.dir.resolve()), region=region,
                             network=container_network, mask=mask)  # fmt: skip
        self.supervisor = Supervisor(
            self.dir / "logs",
            self._replica_changed,
            run_dir=self.dir / "run",
            drain=self._drain_replica,
            restart=restart,
            isolation=isolation,
            # Secure by default: replicas never see the data directory this agent lives in.
            sandbox=sandbox or Sandbox(SandboxPolicy(data_dir=data_dir)),
            # Replicas' output never stores a key or token the host knows (this agent's too).
            mask=mask,
            log_limits=log_limits,
            region=region,
        )

        self._state_dirty = asyncio.Event()
        #: While ``restore`` puts a previous agent's state back, nothing is saved over it.
        self._restoring = False
        key = default_trusted_key(data_dir) if trusted_key is None else trusted_key
        if isinstance(key, Path) and key.name == KEY_FILE:
            raise ValueError(f"{key} is the private signing key; the agent takes the public one")
        self.verifier = ArtifactVerifier(key, self.engine.client)
        self.fetcher = fetcher

    async def localise(self, spec: RevisionSpec) -> RevisionSpec:
        """``spec`` naming this machine's copy of its artifact: fetched into the agent's cache
        by a joined agent (``agent.fetching``) once its signature checks out (nothing unsigned
        is downloaded), unchanged otherwise. Called before ``verify`` for every start and
        restore; ``ArtifactVerificationFailed`` when it cannot be had."""
        if self.fetcher is None:
            return spec
        await asyncio.to_thread(self.verifier.verify_signature, spec)
        return await self.fetcher.localise(spec)

    async def verify(self, spec: RevisionSpec) -> None:
        """ArtifactVerificationFailed unless ``spec``'s artifact is signed by the control plane
        and hashes to its digest (in a worker thread: it reads and hashes the whole tree); an
        image must be in the engine as signed (``agent.images``)."""
        if spec.artifact_kind == "oci-image":
            await self.connect_engine()
        await asyncio.to_thread(self.verifier.verify, spec)

    async def connect_engine(self) -> None:
        """Connect to the Docker Engine if not yet (tried again while it fails)."""
        if self.engine.launcher is None:
            self.supervisor.containers = await self.engine.connect()

    def artifact_kinds(self) -> list[str]:
        """What this agent can run now (``/v1/health``; the control plane's preflight)."""
        return ["directory", "oci-image"] if self.engine.launcher else ["directory"]

    # --- routing -----------------------------------------------------------------------------

    async def start_entry(self) -> None:
        """Bind the shared listeners asked for (HTTPS first, so the HTTP listener's redirects
        name its real port); an OSError names the address. Called once, before ``restore``."""
        limits = self.router_limits.with_overrides({"max_connections": self.connections.limit})
        if self.https_listen is not None:
            self.tls_cert_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            listener = EntryListener(
                "https",
                limits=limits,
                budget=self.connections,
                certificates=DirectoryCertificates(self.tls_cert_dir),
            )
            host, port = self.https_listen
            self.entry_ports["https"] = await listener.start(host, port)
            self.entries["https"] = listener
            log.info("shared https listener on %s:%d", host, self.entry_ports["https"])
        if self.http_listen is not None:
            listener = EntryListener(
                "http",
                limits=limits,
                budget=self.connections,
                https_port=self.entry_ports.get("https", 443),
            )
            host, port = self.http_listen
            self.entry_ports["http"] = await listener.start(host, port)
            self.entries["http"] = listener
            log.info("shared http listener on %s:%d", host, self.entry_ports["http"])
        self._configure_entries()

    def _configure_entries(self) -> None:
        services = [route.entry() for route in self.routes.values() if route.hosts]
        for listener in self.entries.values():
            listener.configure(services)

    async def ensure_service(
        self, service: str, port: int = 0, *, exact: bool = False
    ) -> ServiceRoute:
        """The service's route, its listener started on ``port`` if it has none (0: any).
        A taken port falls back to any free one (a restore keeps serving) unless ``exact``
        (the manifest chose it): then a 409 naming the port, and who holds it if we do."""
        route = self.routes.get(service)
        if route is None:
            if exact and port:
                self._refuse_taken_port(service, port)
            proxy = ServiceProxy(service, limits=self.router_limits, budget=self.connections)
            route = ServiceRoute(service, proxy, port)
            await self._listen(route, exact=exact)
            self.routes[service] = route
            self._save_state()
        return route

    async def _listen(self, route: ServiceRoute, *, exact: bool = False) -> None:
        """Start ``route``'s listener on its port (0: any) and record the port bound. A taken
        port falls back to any free one unless ``exact`` (then a 409 naming it)."""
        try:
            route.port = await self._bind(route.proxy, route.port)
        except OSError as exc:
            if not route.port:
                raise
            if exact:
                await route.proxy.close()
                raise HTTPException(409, _port_taken(route.service, route.port, exc)) from exc
            log.warning(
                "port %s for %s is taken (%s); picking another", route.port, route.service, exc
            )
            route.port = await self._bind(route.proxy, 0)

    async def _bind(self, proxy: ServiceProxy, port: int) -> int:
        """Start ``proxy`` on ``port``, or (0) on a free port of ``port_range`` if there is one."""
        if port or self.port_range is None:
            return await proxy.start(self.listen_host, port)
        low, high = self.port_range
        for candidate in random.sample(range(low, high + 1), high - low + 1):
            with contextlib.suppress(OSError):
                return await proxy.start(self.listen_host, candidate)
        raise OSError(f"no free port left in --port-range {low}-{high}")

    def _refuse_taken_port(self, service: str, port: int) -> None:
        for other in self.routes.values():
            if other.service != service and other.port == port:
                raise HTTPException(
                    409,
                    f"port {port} asked for service {service!r} is already the listener of "
                    f"service {other.service!r} on this agent; choose another [service] port",
                )

    async def apply_entry(self, service: str, entry: EntrySpec) -> None:
        """Give ``service`` the port and shared-listener hosts its manifest asks for. Refused
        with nothing changed: a host another service claims (409 naming it), a port another
        service or process holds (409 naming the port). The hosts take effect at once."""
        rules = tuple(parse_host_rule(h) for h in entry.hosts)
        claims = {r.service: r.hosts for r in self.routes.values() if r.service != service}
        try:
            check_hosts({**claims, service: rules})
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from exc
        route = self.routes.get(service)
        if route is None:
            route = await self.ensure_service(service, entry.port or 0, exact=True)
        elif entry.port and entry.port != route.port:
            self._refuse_taken_port(service, entry.port)
            try:
                route.port = await route.proxy.move(self.listen_host, entry.port)
            except OSError as exc:
                raise HTTPException(409, _port_taken(service, entry.port, exc)) from exc
        route.hosts = rules
        route.https_redirect = entry.https_redirect
        route.hsts_max_age = entry.hsts_max_age
        if route.revision_header != entry.revision_header:
            route.revision_header = entry.revision_header
            self._reconfigure(route)
        self._configure_entries()
        self._save_state()

    def set_limits(self, service: str, overrides: Mapping[str, float | int]) -> RouterLimits:
        """Give ``service``'s router its own limits (over the agent's defaults; empty: the
        defaults again), in force from its next sweep tick, and persist them."""
        route = self.routes.get(service)
        if route is None:
            raise HTTPException(404, f"service {service} has no route on this agent")
        try:
            limits = self.router_limits.with_overrides(dict(overrides))
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        route.limit_overrides = dict(overrides)
        route.proxy.limits = limits
        self._save_state()
        return limits

    def url(self, route: ServiceRoute) -> str:
        return f"http://{self.listen_host}:{route.port}"

    def entry_urls(self, route: ServiceRoute) -> list[str]:
        """Where the shared listeners serve ``route``'s hosts (wildcards as written)."""
        urls = []
        for scheme, port in self.entry_ports.items():
            default = 443 if scheme == "https" else 80
            suffix = "" if port == default else f":{port}"
            urls += [f"{scheme}://{r.host}{suffix}{r.path or '/'}" for r in route.hosts]
        return urls

    async def _drain_replica(self, replica: Replica, timeout: float) -> bool:
        """Wait until the router has answered every request it sent ``replica``."""
        route = self.routes.get(replica.spec.service)
        if route is None:
            return True
        return await route.proxy.drain_replica(replica.replica_id, timeout)

    def _replica_changed(self, replica: Replica) -> None:
        route = self.routes.get(replica.spec.service)
        if route is not None:
            self._reconfigure(route)
        self._save_state()

    def _reconfigure(self, route: ServiceRoute) -> None:
        # Built from each replica's current port: a restarted replica's Backend follows it.
        backends = [
            Backend(r.replica_id, r.spec.revision, "127.0.0.1", r.port)
            for r in self.supervisor.of_service(route.service)
            if r.serving
        ]
        route.proxy.configure(
            route.weights,
            backends,
            sticky_header=route.sticky_header,
            sticky_cookie=route.sticky_cookie,
            revision_header=route.revision_header,
        )

    def set_weights(
        self,
        service: str,
        weights: Mapping[str, int],
        sticky_header: str | None = None,
        sticky_cookie: str | None = None,
    ) -> dict[str, int]:
        route = self.routes.get(service)
        if route is None:
            raise HTTPException(404, f"service {service} has no route on this agent")
        positive = {rev: w for rev, w in weights.items() if w > 0}
        if positive and sum(positive.values()) != 100:
            raise HTTPException(422, f"weights must sum to 100, got {sum(positive.values())}")
        for rev in positive:
            if not any(r.serving for r in self.supervisor.of_revision(service, rev)):
                raise HTTPException(
                    409, f"revision {rev} of {service} has no routable replica; start it first"
                )
        previous = (route.weights, route.sticky_header, route.sticky_cookie)
        route.weights = dict(positive)
        route.sticky_header, route.sticky_cookie = sticky_header, sticky_cookie
        try:
            self._reconfigure(route)
        except ValueError as exc:  # a sticky name that is not a header/cookie token
            route.weights, route.sticky_header, route.sticky_cookie = previous
            self._reconfigure(route)
            raise HTTPException(422, str(exc)) from exc
        self._save_state()
        return route.proxy.weights

    # --- state -------------------------------------------------------------------------------

    def service_state(self, service: str) -> dict[str, Any]:
        route = self.routes.get(service)
        if route is None:
            raise HTTPException(404, f"service {service} has no route on this agent")
        return {
            "service": service,
            "url": self.url(route),
            "weights": route.proxy.weights,
            "sticky": {"header": route.sticky_header, "cookie": route.sticky_cookie},
            "entry": {
                "hosts": [str(r) for r in route.hosts],
                "https_redirect": route.https_redirect,
                "hsts_max_age": route.hsts_max_age,
                "revision_header": route.revision_header,
                "urls": self.entry_urls(route),
            },
            "router": {
                "limits": route.proxy.limits.to_dict(),
                "connections": route.proxy.connection_stats(),
            },
            "replicas": [r.status().to_dict() for r in self.supervisor.of_service(service)],
        }

    def _snapshot(self) -> dict[str, Any]:
        specs: dict[str, dict[str, Any]] = {}
        for r in self.supervisor.replicas.values():
            # A replica waiting out its restart backoff is still one the revision should have.
            if r.wanted:
                s = specs.setdefault(
                    r.spec.revision,
                    {"spec": r.spec.to_dict(), "routable": False, "pids": [], "containers": []},
                )
                s["spec"]["replicas"] = sum(
                    1
                    for x in self.supervisor.of_revision(r.spec.service, r.spec.revision)
                    if x.wanted
                )
                s["routable"] = s["routable"] or r.routable
                if r.process and r.process.returncode is None:
                    s["pids"].append([r.process.pid, r.replica_id])
                if r.handle is not None and r.handle.container_id and r.alive:
                    # Containers outlive the agent: the next one adopts them (``restore``).
                    s["containers"].append(
                        [r.replica_id, r.handle.container_id, r.port, r.restarts]
                    )
        return {
            "services": {
                name: {
                    "port": route.port,
                    "weights": route.weights,
                    "sticky_header": route.sticky_header,
                    "sticky_cookie": route.sticky_cookie,
                    "limits": route.limit_overrides,
                    "hosts": [str(r) for r in route.hosts],
                    "https_redirect": route.https_redirect,
                    "hsts_max_age": route.hsts_max_age,
                    "revision_header": route.revision_header,
                }
                for name, route in self.routes.items()
            },
            "revisions": list(specs.values()),
        }

    def _save_state(self) -> None:
        if self._restoring:  # half put back: the file keeps the whole of what was there
            return
        write_private(self.dir / "state.json", json.dumps(self._snapshot(), indent=1))

    async def restore(self) -> None:
        """Put back what a previous agent ran: same ports, same revisions, same weights.

        Its replicas' state directories go first (after its orphaned replicas): the restored
        process replicas are new ones, with new ids and fresh state. Containers are adopted
        instead (same ids, ports and container ids, not restarted: ``Supervisor.adopt``), and
        containers of this agent that no state names are removed.
        """
        await self.connect_engine()
        path = self.dir / "state.json"
        try:
            state = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError) as exc:
            log.error("cannot read %s (%s); starting empty", path, exc)
            state = {}
        for rev in state.get("revisions", []):
            for pid, replica_id in rev.get("pids", []):
                kill_orphan_group(pid, replica_id)
        self.supervisor.clean_stale()
        if not state:
            await self._remove_orphan_containers()
            return
        self._restoring = True
        try:
            await self._restore(state, path)
        finally:
            self._restoring = False
        self._save_state()

    async def _restore(self, state: Mapping[str, Any], path: Path) -> None:
        """Revisions first, then each service's listener with its weights: an adopted container
        serves from the listener's first connection on (listening first answered 503 until the
        replicas were back; now a client is refused and retries, as while no agent ran)."""
        for rev in state.get("revisions", []):
            spec = RevisionSpec.from_dict(rev["spec"])
            try:
                # The state file is on disk: what it names is checked like any other start.
                spec = await self.localise(spec)
                await self.verify(spec)
                for replica_id, container_id, port, restarts in rev.get("containers", []):
                    await self.supervisor.adopt(
                        spec, str(replica_id), str(container_id), int(port), int(restarts)
                    )
                replicas = await self.supervisor.start_revision(spec)
            except (RevisionStartFailed, ArtifactVerificationFailed) as exc:
                log.error("cannot restore %s/%s: %s", spec.service, spec.revision, exc)
                continue
            for r in replicas:
                r.routable = bool(rev.get("routable"))
        for name, svc in state.get("services", {}).items():
            proxy = ServiceProxy(name, limits=self.router_limits, budget=self.connections)
            route = self.routes[name] = ServiceRoute(name, proxy, int(svc.get("port", 0)))
            if svc.get("limits"):
                try:
                    self.set_limits(name, svc["limits"])
                except HTTPException as exc:
                    log.error("ignoring %s's router limits in %s: %s", name, path, exc.detail)
            route.weights = {k: int(v) for k, v in svc.get("weights", {}).items()}
            route.sticky_header = svc.get("sticky_header")
            route.sticky_cookie = svc.get("sticky_cookie")
            route.revision_header = svc.get("revision_header") is True
            self._reconfigure(route)
            self._restore_hosts(route, svc, path)
            await self._listen(route)
        self._configure_entries()
        await self._remove_orphan_containers()

    async def _remove_orphan_containers(self) -> None:
        """Remove this agent's containers that no replica is run by (``restore``)."""
        if self.engine.launcher is not None:
            ours = {r.handle.container_id for r in self.supervisor.replicas.values() if r.handle}
            await self.engine.launcher.remove_orphans({c for c in ours if c})

    async def drive_load(self, service: str, spec: LoadSpec, lease_seconds: float) -> LoadRun:
        """Start load on ``spec.revision`` through ``service``'s router, or renew the lease of
        the same load running; a different load replaces it."""
        route = self.routes.get(service)
        if route is None:
            raise KeyError(service)
        run = self.loads.get(service)
        if run is not None and run.running and run.spec == spec:
            run.renew(lease_seconds)
            return run
        if run is not None:
            self.stop_load(service)
        host = self.url(route).removeprefix("http://")
        run = self.loads[service] = LoadRun(
            route.proxy, spec, host=host, lease_seconds=lease_seconds
        )
        return run

    def stop_load(self, service: str) -> LoadRun | None:
        """Stop ``service``'s load at once; its requests in flight finish in the background
        (``_stopping``), so the caller (a failed analysis, about to roll back) never waits."""
        run = self.loads.pop(service, None)
        if run is not None:
            closing = run.halt()
            self._stopping.add(closing)
            closing.add_done_callback(self._stopping.discard)
        return run

    def _restore_hosts(self, route: ServiceRoute, svc: Mapping[str, Any], path: Path) -> None:
        """Put back a service's shared-listener hosts from ``state.json`` (a bad or conflicting
        entry is logged and left out: the service keeps its own port)."""
        try:
            entry = EntrySpec.from_dict(
                {
                    "hosts": svc.get("hosts", []),
                    "https_redirect": svc.get("https_redirect", False),
                    "hsts_max_age": svc.get("hsts_max_age", 0),
                }
            )
            rules = tuple(parse_host_rule(h) for h in entry.hosts)
            claims = {r.service: r.hosts for r in self.routes.values() if r is not route}
            check_hosts({**claims, route.service: rules})
        except ValueError as exc:
            log.error("ignoring %s's hosts in %s: %s", route.service, path, exc)
            return
        route.hosts = rules
        route.https_redirect = entry.https_redirect
        route.hsts_max_age = entry.hsts_max_age

    async def close(self) -> None:
        for service in list(self.loads):
            self.stop_load(service)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        # Containers keep running (the next agent adopts them), as apps behind kamal-proxy do
        # when the proxy goes away; processes, its children, stop with it.
        await self.supervisor.stop_all(keep_containers=True)
        self.engine.close()
        for listener in self.entries.values():
            await listener.close()
        for route in self.routes.values():
            await route.proxy.close()


#: Where an agent keeps the shared listeners it was started with (``entry.json`` in its
#: directory), so an agent that ``shipyard serve`` starts again after a crash (without flags)
#: opens the same ones.
ENTRY_FILE = "entry.json"


def remembered_entry(
    directory: Path,
    http_listen: tuple[str, int] | None,
    https_listen: tuple[str, int] | None,
    tls_cert_dir: Path | None,
    *,
    given: bool,
) -> tuple[tuple[str, int] | None, tuple[str, int] | None, Path | None]:
    """The shared listeners to open: the ones given (``given``: the command line named any;
    they replace what was remembered, none at all forgets it), else the remembered ones."""
    path = directory / ENTRY_FILE
    if given:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)  # (a first start: not yet)
        if http_listen is None and https_listen is None:
            path.unlink(missing_ok=True)
        else:
            doc = {
                "http_listen": list(http_listen) if http_listen else None,
                "https_listen": list(https_listen) if https_listen else None,
                "tls_cert_dir": str(tls_cert_dir) if tls_cert_dir else None,
            }
            write_private(path, json.dumps(doc))
        return http_listen, https_listen, tls_cert_dir
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None, tls_cert_dir
    except (OSError, ValueError) as exc:
        log.error("cannot read %s (%s); no shared listeners", path, exc)
        return None, None, tls_cert_dir

    def address(value: Any) -> tuple[str, int] | None:
        return (str(value[0]), int(value[1])) if value else None

    cert_dir = doc.get("tls_cert_dir")
    return (
        address(doc.get("http_listen")),
        address(doc.get("https_listen")),
        Path(cert_dir) if cert_dir else tls_cert_dir,
    )


def _port_taken(service: str, port: int, exc: OSError) -> str:
    return (
        f"port {port} asked for service {service!r} cannot be used: {exc.strerror or exc} "
        "(another process holds it?); choose another [service] port or free it"
    )


async def run_agent(
    data_dir: Path,
    region: str,
    api_port: int = 0,
    trusted_key: Path | None = None,
    *,
    sandbox: Sandbox | None = None,
    router_limits: RouterLimits | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    log_limits: LogLimits | None = None,
    http_listen: tuple[str, int] | None = None,
    https_listen: tuple[str, int] | None = None,
    tls_cert_dir: Path | None = None,
    entry_given: bool = False,
    docker_host: str | None = None,
    container_network: ContainerNetwork = "auto",
    fetcher: ArtifactFetcher | None = None,
    listen_host: str = "127.0.0.1",
    port_range: tuple[int, int] | None = None,
    api_socket: socket.socket | None = None,
    api_ssl: ssl.SSLContext | None = None,
    background: Callable[[], Coroutine[Any, Any, None]] | None = None,
    shared_dir: Path | None = None,
) -> None:
    """Run the agent until SIGTERM/SIGINT; writes agent.json once the API listens.
    A joined agent (agent/joining.py) passes ``listen_host`` and ``port_range`` (its services),
    ``api_socket`` (its API, already bound), ``api_ssl`` (mutual TLS instead of the token) and
    ``background`` (its certificate renewal, cancelled at shutdown); ``serve --shared-dir``'s
    local agent passes ``shared_dir`` (see :class:`Agent`).
    ``trusted_key``: the control plane's public key (default ``<data_dir>/keys/signing.pub``);
    ``router_limits``, ``max_connections``, ``log_limits``, the shared listeners: see
    :class:`Agent`; ``entry_given``: the shared listeners were named on the command line (else
    the ones the agent remembered, ``remembered_entry``); ``fetcher``: see :class:`Agent`."""
    hold_agent_lock(agent_dir(data_dir, region), region)  # released when the process ends
    http_listen, https_listen, tls_cert_dir = remembered_entry(
        agent_dir(data_dir, region), http_listen, https_listen, tls_cert_dir, given=entry_given
    )
    # Before any socket: every idle client holds a descriptor, and at the usual soft limit of
    # 1,024 a thousand of them took every service and this API down at once (issue 10).
    before, after = raise_descriptor_limit()
    log.info("descriptor limit (RLIMIT_NOFILE) raised from %d to %d", before, after)
    agent = Agent(
        data_dir,
        region,
        trusted_key=trusted_key,
        sandbox=sandbox,
        router_limits=router_limits,
        max_connections=max_connections,
        log_limits=log_limits,
        http_listen=http_listen,
        https_listen=https_listen,
        tls_cert_dir=tls_cert_dir,
        docker_host=docker_host,
        container_network=container_network,
        fetcher=fetcher,
        listen_host=listen_host,
        port_range=port_range,
        shared_dir=shared_dir,
    )
    write_private(agent.dir / "agent.token", agent.token)
    await agent.start_entry()
    await agent.restore()
    config = uvicorn.Config(
        build_app(agent, require_token=api_ssl is None),
        host="127.0.0.1",
        port=api_port,
        log_level="warning",
        lifespan="off",
        access_log=False,
        ssl_context_factory=None if api_ssl is None else (lambda _config, _default: api_ssl),
    )
    server = uvicorn.Server(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server_task = loop.create_task(server.serve([api_socket] if api_socket else None))
    while not server.started:
        if server_task.done():
            await server_task
            raise SystemExit(f"agent API could not start on 127.0.0.1:{api_port}")
        await asyncio.sleep(0.01)
    sock = server.servers[0].sockets[0]
    port = sock.getsockname()[1]
    scheme, host = ("https", listen_host) if api_ssl else ("http", "127.0.0.1")
    info = {
        "pid": os.getpid(),
        "region": region,
        "api_url": f"{scheme}://{host}:{port}",
        "started_at": time.time(),
    }
    write_private(agent.dir / "agent.json", json.dumps(info))
    log.info("agent for region %s listening on %s", region, info["api_url"])
    extra = loop.create_task(background()) if background is not None else None
    await stop.wait()
    if extra is not None:
        extra.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await extra
    await stop_server(server, server_task)  # an idle control-plane connection cannot hold it
    await agent.close()
    with contextlib.suppress(FileNotFoundError):
        (agent.dir / "agent.json").unlink()
