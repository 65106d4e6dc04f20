"""Regions with remote agents: adding them (a join token), joining, renewing, removing, and the
control plane's runtimes for them.

``RegionService`` is what the API's region routes (``api/regions.py``), the fleet listener
(``api/fleet.py``) and ``shipyard region`` (cli/regions.py, on the data directory directly, like
``shipyard token``) call. It keeps the region registry (``store/regions.py``), the fleet PKI
(``security/pki.py``) and, in a server, the ONE mutable ``runtimes`` dict the pipeline and the
API share: a region that joins is added to it, a removed one deleted, and ``sync_runtimes``
(run every few seconds by ``serve``) puts the dict in line with the registry when another
process (``shipyard region remove``) changed it.

Join token text: ``syj1.<id>.<secret>.<fleet CA fingerprint>``. The store keeps the id and the
SHA-256 of the secret, never the secret; the fingerprint lets the agent pin the CA it fetches
(``GET /fleet/v1/ca``) before it trusts anything the listener says. A token is used once and
expires (default one hour); refused as unknown, expired, used, or for a region removed since.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import ssl
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipyard.audit import ANCHOR_FILENAME, AuditEvent, AuditLog, SqlAuditLog
from shipyard.domain.models import DNS_LABEL
from shipyard.errors import Conflict, InvalidInput, NotFound, PermissionDenied, ShipyardError
from shipyard.logs import log_event
from shipyard.runtime.base import Runtime
from shipyard.runtime.local import AgentClient, LocalRuntime
from shipyard.security import pki
from shipyard.security.pki import JoinToken
from shipyard.security.signing import Ed25519Signer
from shipyard.store.db import Store
from shipyard.store.engine import open_engine
from shipyard.store.regions import JoinTokenRow, RegionRow, RegionStore

log = logging.getLogger("shipyard.api.fleet_control")

DEFAULT_TOKEN_TTL = 3600
MAX_TOKEN_TTL = 7 * 24 * 3600
#: How long ``serve`` waits for a joined region's first answer at start before going on.
CONNECT_TIMEOUT = 3.0


class JoinRefused(PermissionDenied):
    """A join or renewal the control plane refuses (``reason``: unknown, expired, used,
    wrong_region, region_removed, not_current, no_certificate, not_an_agent)."""

    code = "join_refused"


@dataclass(frozen=True)
class AddedRegion:
    region: str
    token: str
    token_id: str
    expires_at: float
    fingerprint: str


@dataclass(frozen=True)
class Joined:
    """What a joining agent receives: its region and certificate, and whom to trust."""

    region: str
    certificate: str
    fleet_ca: str
    controller_ca: str
    signing_public_key: str


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_region_name(name: str) -> None:
    if not re.fullmatch(DNS_LABEL, name) or len(name) > 63:
        raise InvalidInput(
            f"region name {name[:80]!r} is not a DNS label (lowercase letters, digits and '-', "
            "not at either end, at most 63)"
        )


class RegionService:
    """The region registry, join tokens and fleet certificates (see the module docstring)."""

    def __init__(
        self,
        regions: RegionStore,
        fleet_pki: pki.FleetPki,
        audit: AuditLog | None,
        deployments: Store,
        *,
        shared_dir: Path,
        local_regions: Sequence[str] = (),
        runtimes: MutableMapping[str, Runtime] | None = None,
        cert_ttl_seconds: float = pki.DEFAULT_AGENT_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.regions = regions
        self.pki = fleet_pki
        self.audit = audit
        self.deployments = deployments
        #: Holds keys/ (the artifact-signing key joined agents receive) and fleet.json.
        self.shared_dir = shared_dir
        self.local_regions = tuple(local_regions)
        #: The server's runtimes (None in the CLI: no process to dial from).
        self.runtimes = runtimes
        self.cert_ttl_seconds = cert_ttl_seconds
        self._clock = clock
        self._client_context: ssl.SSLContext | None = None
        self._lock = asyncio.Lock()
        #: Clients of dropped regions, closed after ``CLOSE_GRACE``.
        self._closing: set[asyncio.Task[None]] = set()

    @classmethod
    def for_data_dir(
        cls, data_dir: Path, shared_dir: Path | None = None, *, database: str | None = None
    ) -> RegionService:
        """The CLI's service over ``data_dir``'s audit anchor, the store ``database`` (None:
        SQLite in ``data_dir``) and the PKI, keys and fleet.json in ``shared_dir`` (default
        ``data_dir``; ``serve --shared-dir``)."""
        if not data_dir.is_dir():
            raise InvalidInput(f"data directory {data_dir} does not exist")
        shared = shared_dir or data_dir
        engine = open_engine(database, data_dir)
        return cls(
            RegionStore(engine),
            pki.FleetPki.for_data_dir(shared),
            SqlAuditLog(engine, data_dir / ANCHOR_FILENAME),
            Store(engine),
            shared_dir=shared,
        )

    def close(self) -> None:
        self.regions.engine.dispose()

    # --- the registry -------------------------------------------------------------------------

    async def add(self, name: str, ttl_seconds: int, *, by: str) -> AddedRegion:
        """Register ``name`` and issue its join token (audited ``region.added``). InvalidInput
        for a bad name or lifetime, Conflict for a region that exists (here or as a local
        region of this server)."""
        check_region_name(name)
        if not 0 < ttl_seconds <= MAX_TOKEN_TTL:
            raise InvalidInput(f"a join token lives 1 s to {MAX_TOKEN_TTL} s, not {ttl_seconds}")
        if name in self.local_regions:
            raise Conflict(f"region {name!r} is this server's local region; pick another name")
        fingerprint = await asyncio.to_thread(self.pki.fingerprint)
        now = self._clock()
        token = JoinToken(secrets.token_hex(8), secrets.token_urlsafe(32), fingerprint)
        row = JoinTokenRow(
            id=token.id,
            secret_sha256=_sha256(token.secret),
            region=name,
            created_at=now,
            expires_at=now + ttl_seconds,
        )
        await asyncio.to_thread(self.regions.add, name, row, at=now)
        await self._audit("region.added", by, name, token_id=token.id, expires_at=row.expires_at)
        return AddedRegion(name, token.text, token.id, row.expires_at, fingerprint)

    async def list(self) -> Sequence[RegionRow]:
        return await asyncio.to_thread(self.regions.list)

    async def remove(self, name: str, *, by: str) -> RegionRow:
        """Unregister ``name`` (audited ``region.removed``): its agent's certificate is refused
        from now on and this server stops dialing it. NotFound for an unknown region, Conflict
        while a deployment is active there (nothing changes)."""
        async with self._lock:
            row = await asyncio.to_thread(self.regions.get, name)
            if row is None:
                raise NotFound(f"no region {name!r}; `shipyard region list` shows them")
            for doc in await asyncio.to_thread(self.deployments.active_deployments):
                if name in (doc.get("regions") or [doc.get("region")]):
                    raise Conflict(
                        f"deployment {doc.get('id')} of {doc.get('service')} is active in region "
                        f"{name}; wait for it to end or abort it, then remove the region",
                        deployment_id=doc.get("id"),
                    )
            await asyncio.to_thread(self.regions.remove, name)
            await self._drop_runtime(name)
        await self._audit("region.removed", by, name, agent_url=row.agent_url)
        return row

    # --- joining and renewing (the fleet listener) ---------------------------------------------

    async def join(
        self, token_text: str, csr: str, agent_url: str, *, expect: str | None = None
    ) -> Joined:
        """Use a join token: sign the agent's CSR for the token's region, record the agent's
        URL and certificate serial, add its runtime (audited ``region.joined``). JoinRefused
        with the reason; a bad CSR or URL is InvalidInput, and neither uses the token."""
        token = JoinToken.parse(token_text)
        _check_agent_url(agent_url)
        pki.check_csr(csr)  # before the token is used: a bad CSR must not burn it
        row = await asyncio.to_thread(self.regions.token, token.id)
        if row is None or not hmac.compare_digest(row.secret_sha256, _sha256(token.secret)):
            raise JoinRefused("unknown join token; ask for a new one", reason="unknown")
        now = self._clock()
        if row.used_at is not None:
            raise JoinRefused(
                f"this join token of region {row.region} was already used; `shipyard region "
                "remove` and `add` it again for a new one",
                reason="used",
            )
        if expect is not None and expect != row.region:
            raise JoinRefused(
                f"this join token is for region {row.region}, not {expect}; it was not used",
                reason="wrong_region",
            )
        if row.expires_at <= now:
            raise JoinRefused(
                f"this join token of region {row.region} expired; issue a new one", reason="expired"
            )
        issued = await asyncio.to_thread(
            self.pki.issue_agent, csr, row.region, self.cert_ttl_seconds
        )
        async with self._lock:
            done = await asyncio.to_thread(
                self.regions.join, token.id, row.region, issued.serial, agent_url, at=now
            )
            if not done:
                if await asyncio.to_thread(self.regions.get, row.region) is None:
                    raise JoinRefused(
                        f"region {row.region} was removed; its tokens no longer join",
                        reason="region_removed",
                    )
                raise JoinRefused("this join token was used or expired meanwhile", reason="used")
            await self._set_runtime(row.region, agent_url)
        await self._audit(
            "region.joined",
            f"region:{row.region}",
            row.region,
            agent_url=agent_url,
            serial=issued.serial,
            token_id=token.id,
        )
        return Joined(
            region=row.region,
            certificate=issued.pem.decode(),
            fleet_ca=(await asyncio.to_thread(self.pki.ca_pem)).decode(),
            controller_ca=(await asyncio.to_thread(self.pki.controller_ca_pem)).decode(),
            # The key the gate signs artifacts with (made now if nothing was signed yet).
            signing_public_key=(
                await asyncio.to_thread(Ed25519Signer.load_or_create, self.shared_dir)
            ).public_key_pem(),
        )

    async def authorize(self, der: bytes | None) -> tuple[str, str]:
        """(region, serial) of a verified client certificate that is its registered region's
        current or previous one (``api/fleet.require_region``); JoinRefused otherwise."""
        if not der:
            raise JoinRefused(
                "this route needs the agent's client certificate", reason="no_certificate"
            )
        try:
            region, serial = pki.peer_identity(der)
        except InvalidInput as exc:
            raise JoinRefused(exc.message, reason="not_an_agent") from exc
        row = await asyncio.to_thread(self.regions.get, region)
        if row is None:
            raise JoinRefused(f"region {region} is not registered", reason="region_removed")
        if not row.accepts(serial):
            raise JoinRefused(
                f"certificate {serial} is not region {region}'s current one", reason="not_current"
            )
        return region, serial

    async def renew(self, region: str, presented: str, csr: str, agent_url: str) -> str:
        """A new certificate for ``region``'s new key (the presented certificate, already
        authorized, becomes the previous one); the agent URL is updated if it moved."""
        _check_agent_url(agent_url)
        issued = await asyncio.to_thread(self.pki.issue_agent, csr, region, self.cert_ttl_seconds)
        async with self._lock:
            row = await asyncio.to_thread(self.regions.get, region)
            done = await asyncio.to_thread(
                self.regions.renew, region, presented, issued.serial, agent_url
            )
            if not done:
                raise JoinRefused(
                    f"region {region} was removed or renewed by another certificate",
                    reason="not_current",
                )
            if row is not None and row.agent_url != agent_url:
                await self._set_runtime(region, agent_url)
        log_event(log, "region.renewed", region=region, serial=issued.serial)
        return issued.pem.decode()

    # --- the server's runtimes ------------------------------------------------------------------

    def client_context(self) -> ssl.SSLContext:
        """The controller's mTLS client context (made once)."""
        if self._client_context is None:
            self._client_context = pki.controller_client_context(self.pki)
        return self._client_context

    def runtime_for(self, region: str, agent_url: str) -> LocalRuntime:
        """The runtime of a joined region: the agent API over mTLS, never spawned."""
        client = AgentClient(
            agent_url,
            "",
            region,
            ssl_context=self.client_context(),
            sni_hostname=pki.region_hostname(region),
        )
        return LocalRuntime(region, client)

    async def _set_runtime(self, region: str, agent_url: str) -> LocalRuntime | None:
        """Dial ``region`` at ``agent_url`` from now on (no call made yet: a joining agent is
        not serving until its join is answered)."""
        if self.runtimes is None:
            return None
        await self._drop_runtime(region)
        runtime = self.runtimes[region] = self.runtime_for(region, agent_url)
        return runtime

    async def _drop_runtime(self, region: str) -> None:
        """Stop dialing ``region``. Its client is closed a little later, not now: a caller that
        took the runtime just before (the reconciler iterates over a copy of the dict) must get
        an answer or AgentUnavailable, not a closed client's error."""
        if self.runtimes is None or region in self.local_regions:
            return
        old = self.runtimes.pop(region, None)
        if isinstance(old, LocalRuntime):
            task = asyncio.get_running_loop().create_task(_close_later(old))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def sync_runtimes(self) -> None:
        """Put ``runtimes`` in line with the registry: joined regions dialed (at their current
        URL), removed ones dropped. ``serve`` calls it at start and every few seconds, so a
        ``shipyard region remove`` from another process takes effect here too. Regions added
        are asked what they run, all at once and briefly: one that does not answer is added all
        the same (its calls fail until it does) and does not hold up ``serve``'s start."""
        if self.runtimes is None:
            return
        rows = {r.name: r for r in await self.list() if r.agent_url}
        added: list[LocalRuntime] = []
        async with self._lock:
            for name in [n for n in self.runtimes if n not in self.local_regions]:
                if name not in rows:
                    await self._drop_runtime(name)
                    log_event(log, "region.dropped", region=name)
            for name, row in rows.items():
                current = self.runtimes.get(name)
                url = current.agent.api_url if isinstance(current, LocalRuntime) else None
                if name not in self.local_regions and (current is None or url != row.agent_url):
                    assert row.agent_url is not None
                    runtime = await self._set_runtime(name, row.agent_url)
                    if runtime is not None:
                        added.append(runtime)
        await asyncio.gather(*(_first_answer(r) for r in added))

    async def aclose(self) -> None:
        if self.runtimes is not None:
            for name in [n for n in self.runtimes if n not in self.local_regions]:
                await self._drop_runtime(name)
        for task in list(self._closing):
            task.cancel()  # _close_later closes at once when cancelled
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def _audit(self, event_type: str, user: str, region: str, **detail: Any) -> None:
        if self.audit is not None:
            await self.audit.append(
                AuditEvent(
                    event_type=event_type,
                    user=user,
                    region=region,
                    detail={k: v for k, v in detail.items() if v is not None},
                )
            )


#: Seconds a dropped region's client stays open for calls already under way.
CLOSE_GRACE = 30.0


async def _close_later(runtime: LocalRuntime) -> None:
    try:
        await asyncio.sleep(CLOSE_GRACE)
    finally:
        await runtime.aclose()


async def _first_answer(runtime: LocalRuntime) -> None:
    """Ask a joined agent what it runs, briefly: one that does not answer yet is kept (it
    answers later, and its kinds are asked again then)."""
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await runtime.refresh_kinds()
    except (TimeoutError, ShipyardError) as exc:
        log_event(log, "region.unreachable", region=runtime.region, error=repr(exc)[:200])


def _check_agent_url(url: str) -> None:
    if not re.fullmatch(r"https://[A-Za-z0-9.\-\[\]:]{1,255}:[0-9]{1,5}", url):
        raise InvalidInput(f"agent URL {url[:100]!r} must be https://HOST:PORT")
