"""TLS certificates for the shared HTTPS listener: where they come from, and SNI.

``routing.entry`` builds its listener's ``ssl.SSLContext`` with :func:`server_context`, whose SNI
callback asks a :class:`CertificateSource` for the context of the name the client asked for and
swaps it in for that handshake. ``agent.server`` gives it a :class:`DirectoryCertificates` over
``<agent_dir>/certs`` (or ``shipyard agent --tls-cert-dir``).

The seam: :class:`CertificateSource` is one method, ``context_for(server_name)``. Files are the
first source; an ACME client (certificates requested and renewed from Let's Encrypt or another
CA) is the next one, and it needs nothing else from the router: answer ``context_for`` from the
certificates it keeps (and, for TLS-ALPN-01, return a challenge context for the name being
validated). No ACME server can run where Shipyard is tested, so none is shipped yet.

Reload without dropping connections: a handshake picks the context the source returns *now*;
connections already open keep the context they were made with (an ``SSLObject`` holds its own),
so replacing the files changes what new handshakes get and nothing else. A file pair that does
not load (half written, a key that does not match) is logged and the last good context stays.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shipyard.routing.hosts import parse_host_rule

__all__ = [
    "SNI_ATTRIBUTE",
    "CertificateSource",
    "DirectoryCertificates",
    "server_context",
    "tls_context",
]

log = logging.getLogger("shipyard.routing.entry")

#: The ``ssl.SSLObject`` attribute the SNI callback leaves the (normalised) server name in, for
#: the connection to compare with the request's Host (421 when they differ).
SNI_ATTRIBUTE = "shipyard_sni"


class CertificateSource(Protocol):
    """Where the HTTPS listener's certificates come from (files now; ACME later)."""

    def context_for(self, server_name: str) -> ssl.SSLContext | None:
        """The server context for ``server_name`` (lower case, no trailing dot), or None when
        this source has no certificate for it (the handshake is refused). Called on the event
        loop during each handshake: must be quick (cache, and check for changes cheaply)."""
        ...


def tls_context() -> ssl.SSLContext:
    """A server context with the defaults every certificate gets: TLS 1.2 or later, the ssl
    module's default ciphers, HTTP/1.1 offered by ALPN (the router speaks nothing else)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@dataclass(slots=True)
class _Loaded:
    context: ssl.SSLContext | None
    stamp: tuple[int, ...] | None  # the files' (mtime_ns, size) when loaded; None: missing
    checked: float  # monotonic time of the last look at the files


class DirectoryCertificates:
    """Certificates as files: ``<dir>/<host>.pem`` (the chain, leaf first) and
    ``<dir>/<host>.key`` (its private key, PEM, unencrypted), e.g. ``notes.example.com.pem``;
    a wildcard's files are named for it: ``*.example.com.pem``. An exact name's files win over
    the wildcard's. The files are looked at again at most every ``check_interval`` seconds per
    name, during a handshake, and reloaded when their modification time or size changed."""

    def __init__(
        self,
        directory: Path,
        *,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = directory
        self.check_interval = check_interval
        self._clock = clock
        self._loaded: dict[str, _Loaded] = {}

    def cached_names(self) -> list[str]:
        """The names whose files this source keeps an eye on (loaded, or once loaded)."""
        return sorted(self._loaded)

    def context_for(self, server_name: str) -> ssl.SSLContext | None:
        if "/" in server_name:
            return None
        try:  # never a path from an unchecked name: the client chose it
            name = parse_host_rule(server_name).host
        except ValueError:
            return None
        found = self._context(name)
        if found is None and not name.startswith("*."):
            _, dot, parent = name.partition(".")
            if dot and "." in parent:
                found = self._context("*." + parent)
        return found

    def _context(self, name: str) -> ssl.SSLContext | None:
        now = self._clock()
        loaded = self._loaded.get(name)
        if loaded is not None and now - loaded.checked < self.check_interval:
            return loaded.context
        cert, key = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        stamp = _stamp(cert, key)
        if loaded is not None and stamp == loaded.stamp:
            loaded.checked = now
            return loaded.context
        context = loaded.context if loaded is not None else None
        if stamp is None:
            if context is not None:
                log.warning("certificate files for %s are gone; serving the last one loaded", name)
        else:
            try:
                fresh = tls_context()
                fresh.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.warning(
                    "cannot load certificate %s with key %s (%s); %s",
                    cert,
                    key,
                    exc,
                    "keeping the previous one" if context is not None else "no certificate yet",
                )
            else:
                if context is not None:
                    log.info("reloaded the certificate for %s from %s", name, cert)
                context = fresh
        if stamp is None and context is None:
            # nothing to remember: a client may send any number of made-up names, and each
            # would stay in memory (two failed stats per such handshake cost less than that)
            self._loaded.pop(name, None)
            return None
        self._loaded[name] = _Loaded(context, stamp, now)
        return context


def _stamp(*paths: Path) -> tuple[int, ...] | None:
    out: list[int] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            return None
        out += (st.st_mtime_ns, st.st_size)
    return tuple(out)


def server_context(source: CertificateSource) -> ssl.SSLContext:
    """The HTTPS listener's context: each handshake takes the context ``source`` returns for the
    client's SNI name; a client that sends no name, or one the source has no certificate for,
    is refused with TLS's ``unrecognized_name`` alert (there is no default certificate to
    leak other names through)."""
    outer = tls_context()

    def choose(
        sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext
    ) -> int | None:
        if name is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        name = name.lower().removesuffix(".")
        try:
            context = source.context_for(name)
        except Exception:  # a failing source must not take the listener down with it
            log.exception("certificate source failed for %s", name)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        if context is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslobj.context = context
        setattr(sslobj, SNI_ATTRIBUTE, name.encode())
        return None

    outer.sni_callback = choose
    return outer
