"""The control plane's fleet listener: where remote agents join, renew and fetch artifacts.

``shipyard serve --fleet-listen HOST:PORT`` starts it (``start_fleet_listener``, from
``api/context.build_context``): a second uvicorn server in the same process and event loop as the
API, over TLS with a certificate of the fleet CA (security/pki.py), with the API's edge limits
(``api/edge``: head size, request deadline, connection cap). Client certificates are optional at
the TLS level, because ``/join`` has none, but one that is sent must chain to the fleet CA or the
handshake fails. Routes::

    GET  /fleet/v1/ca                  public     the fleet CA (PEM); the agent checks its
                                                  fingerprint against the token's before use
    POST /fleet/v1/join                token      CSR -> certificate, CAs, signing key
    POST /fleet/v1/renew               mTLS       CSR -> certificate (the presented one stays
                                                  valid until it expires)
    GET  /fleet/v1/artifacts/{digest}  mTLS       helper ARTIFACTS' router (extra_routers)

**The peer certificate.** uvicorn does not put it in the ASGI scope. ``FleetProtocol`` (uvicorn's
h11 protocol, via ``edge.GuardedH11Protocol``) reads it once per connection in
``connection_made`` -- asyncio calls that after the handshake, from
``transport.get_extra_info("ssl_object").getpeercert(binary_form=True)`` -- and wraps the
connection's ASGI app so every request of that connection carries it as
``scope["shipyard.peer_cert"]`` (DER bytes, or None). A client cannot set a scope key, and
``proxy_headers`` is off, so nothing a client sends can claim another connection's certificate.
``require_region`` (a FastAPI dependency) turns it into the caller's region: 403 problem+json
for no certificate, a region no longer registered, or a serial that is not the region's
current or previous one.

Extra routers (``build_fleet_app(..., extra_routers=[...])``) are included after these routes;
they use ``Region`` (``Annotated[str, Depends(require_region)]``) for authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Generator, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from shipyard.api import edge, problems
from shipyard.api.fleet_control import RegionService
from shipyard.api.limits import BodySizeLimit, ConcurrencyLimit, HeaderCountLimit
from shipyard.errors import ShipyardError
from shipyard.private_files import write_private
from shipyard.security import pki
from shipyard.server_stop import stop_server
from shipyard.settings import Settings

log = logging.getLogger("shipyard.api.fleet")

#: The scope key ``FleetProtocol`` puts the connection's peer certificate (DER) under.
PEER_CERT = "shipyard.peer_cert"
#: Where ``serve`` records the listener's URL for ``shipyard region add`` (in the shared dir).
FLEET_JSON = "fleet.json"
#: How many listener URLs fleet.json remembers (newest first): one per replica, plus a few a
#: replica left behind when it moved; a join command names them all.
MAX_LISTENERS = 8
_MAX_BODY = 64 * 1024

ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


class _WithPeer:
    """One connection's ASGI app: the real one, with the peer certificate in every scope."""

    def __init__(self, app: ASGIApp, der: bytes | None) -> None:
        self.app = app
        self.der = der

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        scope[PEER_CERT] = self.der
        await self.app(scope, receive, send)


class FleetProtocol(edge.GuardedH11Protocol):
    """The API edge's protocol, which also hands the verified peer certificate to the app."""

    def connection_made(self, transport: Any) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self.app = _WithPeer(self.app, der)
        super().connection_made(transport)


@dataclass(frozen=True)
class Peer:
    """The agent on the other end of a request: its region and certificate serial."""

    region: str
    serial: str


def _service(request: Request) -> RegionService:
    service: RegionService = request.app.state.regions
    return service


async def require_peer(request: Request) -> Peer:
    """The caller's region and serial from its verified client certificate (403 otherwise)."""
    der = request.scope.get(PEER_CERT)
    region, serial = await _service(request).authorize(der if isinstance(der, bytes) else None)
    return Peer(region, serial)


async def require_region(peer: Annotated[Peer, Depends(require_peer)]) -> str:
    """The caller's region, for routes only an agent of a registered region may call."""
    return peer.region


#: A route parameter that is the calling agent's region (refused with 403 otherwise).
Region = Annotated[str, Depends(require_region)]


class JoinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(max_length=300)
    csr: str = Field(max_length=16384, description="PEM CSR of the agent's new key.")
    agent_url: str = Field(max_length=300, description="https://HOST:PORT of the agent's API.")
    region: str | None = Field(
        default=None, max_length=63, description="The region the agent expects (--region)."
    )


class JoinResponse(BaseModel):
    region: str
    certificate: str
    fleet_ca: str
    controller_ca: str
    signing_public_key: str


class RenewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    csr: str = Field(max_length=16384)
    agent_url: str = Field(max_length=300)


class RenewResponse(BaseModel):
    certificate: str


def build_fleet_app(
    regions: RegionService, settings: Settings, *, extra_routers: Sequence[APIRouter] = ()
) -> FastAPI:
    """The fleet listener's app over ``regions``; ``extra_routers`` (e.g. helper ARTIFACTS'
    ``artifact_routes(...)``) are included as they are -- the one place to plug routes in."""
    app = FastAPI(title="shipyard fleet", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.regions = regions
    app.add_middleware(BodySizeLimit, max_bytes=_MAX_BODY)
    # As the API's: refused before routing when too many run at once or the head is too long.
    app.add_middleware(ConcurrencyLimit, max_requests=settings.max_concurrent_requests)
    app.add_middleware(HeaderCountLimit, max_headers=settings.max_header_count)
    problems.install(app)
    answers = problems.responses(403, 413, 422, 500)

    @app.get("/fleet/v1/ca", responses=answers)
    async def ca() -> Response:
        """The fleet CA certificate: public; an agent trusts it only if its SHA-256 matches the
        fingerprint its join token carries."""
        pem = await asyncio.to_thread(regions.pki.ca_pem)
        return Response(pem, media_type="application/x-pem-file")

    @app.post("/fleet/v1/join", responses=answers)
    async def join(body: JoinRequest) -> JoinResponse:
        joined = await regions.join(body.token, body.csr, body.agent_url, expect=body.region)
        return JoinResponse(**joined.__dict__)

    @app.post("/fleet/v1/renew", responses=answers)
    async def renew(
        body: RenewRequest, peer: Annotated[Peer, Depends(require_peer)]
    ) -> RenewResponse:
        pem = await regions.renew(peer.region, peer.serial, body.csr, body.agent_url)
        return RenewResponse(certificate=pem)

    for router in extra_routers:
        app.include_router(router)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: it runs beside the API's server, which
    owns them and stops this one from its lifespan."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def advertised_host(host: str) -> str:
    """The name agents dial for a listener on ``host`` (this machine's name for 0.0.0.0/::)."""
    try:
        if ipaddress.ip_address(host).is_unspecified:
            return socket.getfqdn()
    except ValueError:
        pass
    return host


def fleet_url(host: str, port: int) -> str:
    shown = advertised_host(host)
    return f"https://[{shown}]:{port}" if ":" in shown else f"https://{shown}:{port}"


@dataclass
class FleetListener:
    """A running fleet listener: its URL, how to keep its certificate fresh, how to stop it."""

    url: str
    server: uvicorn.Server
    task: asyncio.Task[None]
    context: ssl.SSLContext
    regions: RegionService
    names: Sequence[str]

    async def refresh(self) -> None:
        """Re-issue the listener's certificate once a third of its life is left and serve it
        to new handshakes (the same context, reloaded); called by ``serve``'s region sync."""
        crt, _ = self.regions.pki.listener_paths
        cert = await asyncio.to_thread(lambda: pki.load_certificate(crt.read_bytes()))
        if pki.third_left(cert, self.regions.pki.now()):
            crt, key = await asyncio.to_thread(self.regions.pki.listener_certificate, self.names)
            self.context.load_cert_chain(crt, key)
            log.info("fleet listener certificate re-issued")

    async def aclose(self) -> None:
        """Stop serving (``server_stop.stop_server``: an idle agent cannot hold it up)."""
        await stop_server(self.server, self.task)


def announce(shared_dir: Path, url: str, fingerprint: str) -> None:
    """Record a started listener in ``<shared_dir>/fleet.json``: ``url`` (the newest),
    ``fingerprint`` and ``urls`` (every listener announced, newest first, at most
    ``MAX_LISTENERS``), under a lock file, so replicas starting at once lose no URL."""
    path = shared_dir / FLEET_JSON
    fd = os.open(shared_dir / f".{FLEET_JSON}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        urls = [u for u in listener_urls(shared_dir) if u != url]
        doc = {"url": url, "fingerprint": fingerprint, "urls": [url, *urls][:MAX_LISTENERS]}
        write_private(path, json.dumps(doc))
    finally:
        os.close(fd)


def listener_urls(shared_dir: Path) -> list[str]:
    """The fleet listeners' URLs recorded in ``<shared_dir>/fleet.json``, newest first; empty
    when none ever ran (or the file is unreadable)."""
    try:
        doc = json.loads((shared_dir / FLEET_JSON).read_text())
        urls = doc.get("urls") or [doc["url"]]
        return [str(u) for u in urls]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


async def start_fleet_listener(
    regions: RegionService,
    settings: Settings,
    *,
    extra_routers: Sequence[APIRouter] = (),
) -> FleetListener:
    """Serve the fleet app on ``settings.fleet_listen`` until ``aclose``; records the URL in
    ``<shared>/fleet.json`` (``announce``). A port that cannot be bound is a ShipyardError
    naming it."""
    assert settings.fleet_listen is not None
    host, port = settings.fleet_listen
    names = list(dict.fromkeys([host, advertised_host(host), "localhost"]))
    context = await asyncio.to_thread(pki.listener_context, regions.pki, names)
    config = edge.server_config(
        build_fleet_app(regions, settings, extra_routers=extra_routers), settings, host, port
    )
    config.http = FleetProtocol
    config.lifespan = "off"
    config.proxy_headers = False
    config.ssl_context_factory = lambda _config, _default: context
    server = _Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            raise ShipyardError(f"the fleet listener could not start on {host}:{port}")
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    url = fleet_url(host, bound)
    fingerprint = await asyncio.to_thread(regions.pki.fingerprint)
    await asyncio.to_thread(announce, Path(settings.shared_dir), url, fingerprint)
    log.info("fleet listener on %s (CA %s)", url, fingerprint)
    return FleetListener(url, server, task, context, regions, names)
