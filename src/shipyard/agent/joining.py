"""A remote agent's membership of a fleet: joining a control plane, its identity on disk, and
renewing its certificate. ``shipyard agent --join URL --token TOKEN --listen HOST:PORT``
(cli/daemons.py) calls ``prepare``, then ``agent.server.run_agent`` with what it returns.

Several replicas (issue 14): ``--join`` may be given once per control-plane replica's fleet
listener (they share one fleet CA, so one pin covers them all). The agent joins through the
first that answers and keeps the list (``join.json``); renewals and artifact fetches go
through ``FailoverTransport``, which sends each request to the URL that answered last and
moves on to the next one when a connection cannot be made (the request was never sent, so
trying again elsewhere is safe; a GET also when no answer came). Started again with
``--join`` URLs, the stored list is replaced by them (a replica added or moved); the identity
stays.

Joining (once): the token carries the fleet CA's fingerprint, so the agent fetches
``GET /fleet/v1/ca`` WITHOUT verification, refuses it unless its SHA-256 is the pinned one, and
from then on talks to the control plane over TLS verified against that CA (kubeadm's discovery
hash). It makes its own key (EC P-256, never leaves the machine) and sends a CSR with the token
and its API's URL; the answer is its certificate (CN = region, SAN ``<region>.region.shipyard``),
the controller CA (the only CA whose client certificates its API accepts) and the control
plane's public signing key (artifacts must be signed with it).

Files in the agent's data directory (0700; secrets 0600, each written atomically):
``join.json`` (control plane URLs, region, API host and port, port range), ``identity/agent.pem``
(certificate + key in ONE file, so a renewal replaces both at once: a crash never leaves a key
beside another key's certificate), ``identity/fleet-ca.crt``, ``identity/controller-ca.crt``,
``keys/signing.pub``; and as every agent, ``agents/<region>/`` (state.json ...). Started again
with just ``--data-dir`` (or the same flags: a stored identity wins over the token, which is
used up), it comes back with the same identity, address and services.

Renewal: at two thirds of the certificate's life, a new key and CSR over mTLS with the current
certificate (``POST /fleet/v1/renew``); the new pair is written, then loaded into the SAME
server ``SSLContext`` (``load_cert_chain``): handshakes from then on present it, connections
already open keep theirs, nothing is restarted. When the control plane cannot be reached (or
refuses), the agent keeps serving and retries with backoff (1 s doubling to 5 min), logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ipaddress
import json
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shipyard.agent.fetching import ArtifactFetcher
from shipyard.errors import InvalidInput
from shipyard.private_files import ensure_private_dir, write_private
from shipyard.security import pki

log = logging.getLogger("shipyard.agent.joining")

JOIN_JSON = "join.json"
IDENTITY_DIR = "identity"
#: Renewal retries back off up to this (seconds); the agent serves meanwhile.
MAX_RETRY_DELAY = 300.0
_TIMEOUT = httpx.Timeout(15.0)


@dataclass(frozen=True)
class Membership:
    """A joined agent's stored identity (``join.json`` and ``identity/``). ``control_planes``:
    the fleet listeners of the control plane's replicas, the one joined through first."""

    data_dir: Path
    control_planes: tuple[str, ...]
    region: str
    host: str
    port: int
    port_range: tuple[int, int] | None

    @property
    def control_plane(self) -> str:
        """The first fleet listener (the one joined through)."""
        return self.control_planes[0]

    @property
    def identity(self) -> Path:
        return self.data_dir / IDENTITY_DIR

    @property
    def pem(self) -> Path:
        return self.identity / "agent.pem"

    @property
    def fleet_ca(self) -> Path:
        return self.identity / "fleet-ca.crt"

    @property
    def controller_ca(self) -> Path:
        return self.identity / "controller-ca.crt"

    @property
    def agent_url(self) -> str:
        return _url(self.host, self.port)

    def certificate(self) -> x509.Certificate:
        return pki.load_certificate(self.pem.read_bytes())

    def save(self) -> None:
        doc = {
            "control_plane": self.control_plane,  # what an agent of the release before reads
            "control_planes": list(self.control_planes),
            "region": self.region,
            "host": self.host,
            "port": self.port,
            "port_range": list(self.port_range) if self.port_range else None,
        }
        write_private(self.data_dir / JOIN_JSON, json.dumps(doc, indent=1))

    @classmethod
    def load(cls, data_dir: Path) -> Membership | None:
        """The stored membership, or None if this directory never joined."""
        try:
            doc = json.loads((data_dir / JOIN_JSON).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"{data_dir / JOIN_JSON} cannot be read: {exc}") from exc
        ports = doc.get("port_range")
        urls = doc.get("control_planes") or [doc["control_plane"]]
        return cls(
            data_dir,
            tuple(str(u) for u in urls),
            str(doc["region"]),
            str(doc["host"]),
            int(doc["port"]),
            (int(ports[0]), int(ports[1])) if ports else None,
        )


def parse_port_range(text: str | None) -> tuple[int, int] | None:
    """``"20000-20999"`` as (20000, 20999); InvalidInput saying what is wrong."""
    if text is None:
        return None
    low, sep, high = text.partition("-")
    if not sep or not low.isdigit() or not high.isdigit():
        raise InvalidInput(f"--port-range expects LOW-HIGH, e.g. 20000-20999, got {text!r}")
    a, b = int(low), int(high)
    if not 1024 <= a <= b <= 65535:
        raise InvalidInput(f"--port-range {text}: ports must be 1024..65535, low <= high")
    return a, b


def bind(host: str, port: int) -> socket.socket:
    """The agent API's listening socket (bound before joining, so port 0 has a real port to
    announce). InvalidInput naming the address when it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidInput(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(1024)
    sock.set_inheritable(False)
    return sock


def check_urls(urls: Sequence[str]) -> tuple[str, ...]:
    """``--join`` URLs without trailing slashes and duplicates; InvalidInput for none or for
    one that is not https://."""
    found = tuple(dict.fromkeys(u.strip().rstrip("/") for u in urls))
    if not found:
        raise InvalidInput("--join needs the fleet listener's https:// URL")
    for url in found:
        if not url.startswith("https://"):
            raise InvalidInput(
                f"--join expects the fleet listener's https:// URL, got {url[:100]!r}"
            )
    return found


def join(
    data_dir: Path,
    urls: str | Sequence[str],
    token_text: str,
    host: str,
    port: int,
    port_range: tuple[int, int] | None,
    region: str | None = None,
) -> Membership:
    """Join the control plane through the first of ``urls`` that answers, with ``token_text``
    (see the module docstring), and store the identity in ``data_dir`` with every URL.
    InvalidInput when none answers, for a CA that is not the pinned one, or a refusal (with
    the control plane's words): a refusal is final (the token is the same everywhere)."""
    token = pki.JoinToken.parse(token_text)
    every = check_urls([urls] if isinstance(urls, str) else urls)
    unreachable: list[str] = []
    for url in every:
        try:
            # Unverified on purpose: what comes back is trusted only if it hashes to the pin.
            ca = httpx.get(f"{url}/fleet/v1/ca", verify=False, timeout=_TIMEOUT)  # noqa: S501
        except httpx.HTTPError as exc:
            unreachable.append(f"{url}: {exc!r}"[:300])
            log.warning("cannot reach the control plane at %s; trying the next --join URL", url)
            continue
        member = _join_at(data_dir, url, every, ca, token, host, port, port_range, region)
        log.info("joined %s as region %s", url, member.region)
        return member
    raise InvalidInput(
        f"cannot reach the control plane at any --join URL: {'; '.join(unreachable)}"
    )


def _join_at(
    data_dir: Path,
    url: str,
    every: tuple[str, ...],
    ca: httpx.Response,
    token: pki.JoinToken,
    host: str,
    port: int,
    port_range: tuple[int, int] | None,
    region: str | None,
) -> Membership:
    """``join`` through ``url``, whose ``/fleet/v1/ca`` answered ``ca``."""
    if ca.status_code != 200 or pki.fingerprint_pem(ca.content) != token.fingerprint:
        raise InvalidInput(
            f"the CA served at {url} is not the one the join token pins (sha256 "
            f"{token.fingerprint}): wrong URL, or someone in between; nothing was stored"
        )
    key = pki.new_key()
    body = {
        "token": token.text,
        "csr": pki.make_csr(key, region or "agent").decode(),
        "agent_url": _url(host, port),
        "region": region,
    }
    answer = _post(url, "/fleet/v1/join", body, pki.agent_client_context(cadata=ca.text))
    cert = pki.load_certificate(str(answer["certificate"]).encode())
    if (
        not pki.check_signature(cert, pki.load_certificate(ca.content))
        or cert.public_key() != key.public_key()
        or pki.peer_identity(cert.public_bytes(serialization.Encoding.DER))[0] != answer["region"]
    ):
        raise InvalidInput("the control plane answered with a certificate that is not ours")
    # Only now is anything stored: a refused join leaves the directory as it was.
    ensure_private_dir(data_dir)
    identity = ensure_private_dir(data_dir / IDENTITY_DIR)
    ordered = (url, *(u for u in every if u != url))  # the one that answered first
    member = Membership(data_dir, ordered, str(answer["region"]), host, port, port_range)
    write_private(identity / "fleet-ca.crt", ca.content)
    write_private(identity / "controller-ca.crt", answer["controller_ca"])
    ensure_private_dir(data_dir / "keys")
    write_private(data_dir / "keys" / "signing.pub", answer["signing_public_key"])
    write_private(member.pem, cert.public_bytes(serialization.Encoding.PEM) + pki.key_pem(key))
    member.save()  # last: its presence means the identity is whole
    return member


def _url(host: str, port: int) -> str:
    """The agent API's URL as the control plane dials it: this machine's name when listening on
    every address (0.0.0.0, ::)."""
    try:
        if ipaddress.ip_address(host).is_unspecified:
            host = socket.getfqdn()
    except ValueError:
        pass
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def _post(url: str, path: str, body: dict[str, Any], context: ssl.SSLContext) -> dict[str, Any]:
    try:
        r = httpx.post(f"{url}{path}", json=body, verify=context, timeout=_TIMEOUT)
    except httpx.HTTPError as exc:
        raise InvalidInput(f"cannot reach the control plane at {url}: {exc!r}"[:500]) from exc
    if r.status_code != 200:
        raise InvalidInput(f"the control plane refused ({r.status_code}): {_reason(r)}")
    doc: dict[str, Any] = r.json()
    return doc


def _reason(r: httpx.Response) -> str:
    try:
        return str(r.json().get("detail"))[:500]
    except ValueError:
        return r.text[:500]


class FailoverTransport(httpx.AsyncBaseTransport):
    """An ``httpx`` transport over several fleet listeners (``Membership.control_planes``):
    each request goes to the one that answered last; when no connection can be made there
    (refused, unreachable, TLS handshake failed: the request was never sent), to the next, in
    turn. A GET (an artifact fetch) also moves on when the connection broke or timed out before
    an answer came: sending it again elsewhere is harmless, and a kept-alive connection to a
    replica that vanished without closing it fails that way. A POST (a renewal) is not sent
    twice that way. An answer, whatever its status, is returned as it is. Used by the
    ``Renewer`` and the artifact fetcher."""

    #: What proves a request was not sent: nothing connected.
    RETRIED = (httpx.ConnectError, httpx.ConnectTimeout)
    #: What else sends a GET elsewhere: no answer came on the connection.
    RETRIED_IDEMPOTENT = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError,
                          httpx.ReadTimeout, httpx.WriteTimeout)  # fmt: skip

    def __init__(
        self, urls: Sequence[str], context: ssl.SSLContext, *, first: str | None = None
    ) -> None:
        self.urls = [httpx.URL(u) for u in urls]
        self._current = list(urls).index(first) if first is not None and first in urls else 0
        self._inner = httpx.AsyncHTTPTransport(verify=context)

    @property
    def current(self) -> str:
        """The URL requests go to first (the one that answered last)."""
        return str(self.urls[self._current]).rstrip("/")

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        failures: list[str] = []
        retried: tuple[type[httpx.TransportError], ...] = self.RETRIED
        if request.method in ("GET", "HEAD"):
            retried = (*self.RETRIED, *self.RETRIED_IDEMPOTENT)
        for step in range(len(self.urls)):
            index = (self._current + step) % len(self.urls)
            base = self.urls[index]
            request.url = request.url.copy_with(scheme=base.scheme, host=base.host, port=base.port)
            request.headers["host"] = base.netloc.decode("ascii")
            try:
                response = await self._inner.handle_async_request(request)
            except retried as exc:
                failures.append(f"{base}: {exc!r}"[:200])
                continue
            if index != self._current:
                self._current = index
                log.warning(
                    "the control plane answers at %s now (%s)", self.current, "; ".join(failures)
                )
            return response
        raise httpx.ConnectError(
            "no fleet listener of the control plane answered: " + "; ".join(failures),
            request=request,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


class Renewer:
    """Renews the agent certificate at 2/3 of its life into ``server_context`` (the API's) and
    ``client_contexts`` (the artifact fetcher's), retrying with backoff while the control plane
    is away. ``run`` is ``run_agent``'s background task."""

    def __init__(
        self,
        member: Membership,
        server_context: ssl.SSLContext,
        client_contexts: Sequence[ssl.SSLContext] = (),
    ) -> None:
        self.member = member
        self.server_context = server_context
        self.client_contexts = tuple(client_contexts)
        #: Where the last renewal was answered: the next one is sent there first.
        self.answered_by: str | None = None

    async def run(self) -> None:
        delay = 1.0
        while True:
            due = pki.renewal_due(self.member.certificate())
            wait = (due - dt.datetime.now(dt.UTC)).total_seconds()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                await self.renew_once()
                delay = 1.0
            except (httpx.HTTPError, InvalidInput, OSError, ValueError) as exc:
                log.warning(
                    "certificate renewal failed (%s); serving on, retrying in %.0f s",
                    str(exc)[:300],
                    delay,
                )
                if _expired(self.member):
                    log.error(
                        "the certificate of region %s expired: the control plane can neither "
                        "dial this agent nor renew it; `shipyard region remove` and `add` the "
                        "region, then start the agent with --join URL --token NEW_TOKEN",
                        self.member.region,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)

    async def renew_once(self) -> None:
        """One renewal: a new key, the CP signs it, the pair is stored and served from now."""
        m = self.member
        key = pki.new_key()
        client = pki.agent_client_context(m.fleet_ca, m.pem, m.pem)
        # First where the last renewal was answered.
        transport = FailoverTransport(m.control_planes, client, first=self.answered_by)
        async with httpx.AsyncClient(
            transport=transport, base_url=m.control_plane, timeout=_TIMEOUT
        ) as http:
            r = await http.post(
                "/fleet/v1/renew",
                json={"csr": pki.make_csr(key, m.region).decode(), "agent_url": m.agent_url},
            )
        self.answered_by = transport.current
        if r.status_code != 200:
            raise InvalidInput(f"the control plane refused ({r.status_code}): {_reason(r)}")
        pem = str(r.json()["certificate"]).encode()
        cert = pki.load_certificate(pem)
        ca = pki.load_certificate(m.fleet_ca.read_bytes())
        if not pki.check_signature(cert, ca) or pki.peer_identity(
            cert.public_bytes(serialization.Encoding.DER)
        ) != (m.region, pki.serial_hex(cert)):
            raise InvalidInput("the renewed certificate is not this region's from the fleet CA")
        write_private(m.pem, pem + pki.key_pem(key))
        for context in (self.server_context, *self.client_contexts):
            context.load_cert_chain(m.pem)  # new handshakes use it; open connections keep theirs
        log.info(
            "certificate renewed through %s: serial %s, valid until %s",
            self.answered_by,
            pki.serial_hex(cert),
            cert.not_valid_after_utc.isoformat(),
        )


def artifact_fetcher(member: Membership, cache_dir: Path) -> tuple[ArtifactFetcher, ssl.SSLContext]:
    """The joined agent's fetcher of directory artifacts from its control plane's fleet
    listeners (mTLS with the agent certificate, ``FailoverTransport`` over every replica's),
    and the client context the ``Renewer`` must keep current."""
    context = pki.agent_client_context(member.fleet_ca, member.pem, member.pem)
    client = httpx.AsyncClient(
        transport=FailoverTransport(member.control_planes, context),
        base_url=member.control_plane,
        timeout=_TIMEOUT,
    )
    return ArtifactFetcher(client, cache_dir), context


def _expired(member: Membership) -> bool:
    try:
        return member.certificate().not_valid_after_utc <= dt.datetime.now(dt.UTC)
    except (OSError, InvalidInput):
        return True


def prepare(
    data_dir: Path,
    *,
    join_urls: Sequence[str],
    token: str | None,
    listen: tuple[str, int] | None,
    port_range: tuple[int, int] | None,
    region: str | None,
) -> tuple[Membership, socket.socket, ssl.SSLContext]:
    """The membership (stored, or made now by joining), the API's bound socket and its mTLS
    server context. A stored identity wins over ``--join``/``--token`` (a token is used once),
    but ``--join`` URLs given again replace the stored ones (a replica added or moved)."""
    member = Membership.load(data_dir)
    if member is not None and join_urls and token and _expired(member):
        # Away longer than its certificate lives: it can no longer renew (the listener refuses
        # an expired certificate), so a new token for a re-added region joins it again.
        log.warning("the stored certificate expired; joining again with the token given")
        member = None
    if member is None:
        if not join_urls or not token or listen is None:
            raise InvalidInput(
                f"{data_dir} has not joined a control plane: pass --join URL --token TOKEN "
                "--listen HOST:PORT"
            )
        sock = bind(*listen)
        port = sock.getsockname()[1]
        try:
            member = join(data_dir, join_urls, token, listen[0], port, port_range, region)
        except BaseException:
            sock.close()
            raise
    else:
        if region is not None and region != member.region:
            raise InvalidInput(f"{data_dir} joined as region {member.region}, not {region}")
        urls = check_urls(join_urls) if join_urls else member.control_planes
        if urls != member.control_planes:
            member = dataclasses.replace(member, control_planes=urls)
            member.save()
            log.info("control plane URLs now %s", ", ".join(urls))
        sock = bind(member.host, member.port)
    context = pki.agent_server_context(member.pem, member.pem, member.controller_ca)
    return member, sock, context
