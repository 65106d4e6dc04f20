"""The shared entry listener (``routing.entry``): two services behind one HTTP and one HTTPS
listener, real upstreams and real sockets. Routing by Host, the router's own 404/421/308,
SNI certificates from the test's CA (reloaded without dropping an open connection), HSTS,
X-Forwarded-Proto, and the edge limits (head timeout, the connection budget) on the shared
listener."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shipyard.domain.hostnames import parse_host_rule
from shipyard.routing.certificates import DirectoryCertificates
from shipyard.routing.entry import EntryListener, ServiceEntry
from shipyard.routing.limits import ConnectionBudget, RouterLimits
from shipyard.routing.proxy import ServiceProxy
from tests.routing.certs import TestCA, presented_serial
from tests.routing.conftest import WAIT, MakeProxy, MakeUpstream, RawClient, Upstream


@dataclass
class Edge:
    """notes.test -> app ``a`` (HSTS on HTTPS), blog.test and *.blog.test -> app ``b``
    (redirected to HTTPS on the HTTP listener); both listeners share one budget."""

    a: Upstream
    b: Upstream
    notes: ServiceProxy
    blog: ServiceProxy
    http: EntryListener
    https: EntryListener
    http_port: int
    https_port: int
    ca: TestCA
    certs: Path
    serials: dict[str, int]

    def services(
        self,
        *,
        blog_hosts: tuple[str, ...] = ("blog.test", "*.blog.test"),
        blog_redirect: bool = True,
    ) -> list[ServiceEntry]:
        return [
            ServiceEntry(
                "notes",
                self.notes.context,
                (parse_host_rule("notes.test"),),
                hsts_max_age=31536000,
            ),
            ServiceEntry(
                "blog",
                self.blog.context,
                tuple(parse_host_rule(h) for h in blog_hosts),
                https_redirect=blog_redirect,
            ),
        ]

    async def tls(self, name: str) -> RawClient:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.https_port, ssl=self.ca.client_context(), server_hostname=name
        )
        return RawClient(reader, writer)


@pytest.fixture
async def edge(tmp_path: Path, upstreams: MakeUpstream, proxies: MakeProxy) -> AsyncIterator[Edge]:
    a, b = await upstreams("a"), await upstreams("b")
    notes, _ = await proxies(service="notes")
    blog, _ = await proxies(service="blog")
    notes.configure({"v1": 100}, [a.backend("v1")])
    blog.configure({"v7": 100}, [b.backend("v7")])
    ca = TestCA(tmp_path / "ca")
    certs = tmp_path / "certs"
    serials = {
        "notes.test": ca.issue(certs, "notes.test"),
        "blog.test": ca.issue(certs, "blog.test"),
        "*.blog.test": ca.issue(certs, "*.blog.test"),
    }
    budget = ConnectionBudget(1000)
    https = EntryListener(
        "https",
        budget=budget,
        # looked at on every handshake: the reload test needs no clock
        certificates=DirectoryCertificates(certs, check_interval=0),
    )
    https_port = await https.start("127.0.0.1", 0)
    http = EntryListener("http", budget=budget, https_port=https_port)
    http_port = await http.start("127.0.0.1", 0)
    e = Edge(a, b, notes, blog, http, https, http_port, https_port, ca, certs, serials)
    for listener in (http, https):
        listener.configure(e.services())
    yield e
    await http.close()
    await https.close()


def _forwarded_proto(app: Upstream) -> str:
    head = app.heads[-1].decode().lower()
    return head.split("x-forwarded-proto: ", 1)[1].split("\r\n", 1)[0]


async def test_http_routes_each_request_by_its_host(edge: Edge) -> None:
    client = await RawClient.open(edge.http_port)
    # one keep-alive connection, three services' worth of requests: each picks its own
    await client.send(b"GET /x HTTP/1.1\r\nhost: NOTES.test:80\r\n\r\n")
    first = await client.response()
    await client.send(b"GET /y HTTP/1.1\r\nhost: notes.test\r\nx-forwarded-proto: https\r\n\r\n")
    second = await client.response()
    assert (first.status, first.body, first.revision) == (200, b"a", "v1")
    assert (second.status, second.body) == (200, b"a")
    assert _forwarded_proto(edge.a) == "http", "a client's claim is replaced, as on a port"
    assert edge.notes.metrics()["v1"].requests == 2, "canary analysis sees shared traffic"
    await client.close()


async def test_one_connection_may_change_service_between_requests(edge: Edge) -> None:
    edge.http.configure(edge.services(blog_redirect=False))
    client = await RawClient.open(edge.http_port)
    seen = []
    for host in ("notes.test", "www.blog.test", "notes.test", "blog.test"):
        await client.send(f"GET / HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
        r = await client.response()
        seen.append((r.status, r.body, r.revision))
    assert seen == [(200, b"a", "v1"), (200, b"b", "v7"), (200, b"a", "v1"), (200, b"b", "v7")]
    for app in (edge.a, edge.b):
        head = app.heads[-1].lower()
        assert head.count(b"x-forwarded-for: 127.0.0.1\r\n") == 1
        assert head.count(b"x-forwarded-proto: http\r\n") == 1
    await client.close()


async def test_unknown_host_gets_the_routers_404_never_an_app(edge: Edge) -> None:
    before = edge.a.requests + edge.b.requests
    for head in (
        b"GET / HTTP/1.1\r\nhost: other.test\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a.b.blog.test\r\n\r\n",  # the wildcard covers one label
        b"GET / HTTP/1.0\r\n\r\n",  # no host at all
        b"GET http://other.test/ HTTP/1.1\r\nhost: notes.test\r\n\r\n",  # the target wins
    ):
        client = await RawClient.open(edge.http_port)
        await client.send(head)
        r = await client.response()
        assert r.status == 404, head
        assert r.body == b"no service on this listener serves this host\n"
        assert "x-shipyard-revision" not in r.headers
        assert await client.closed_by_peer()
        await client.close()
    assert edge.a.requests + edge.b.requests == before


async def test_https_sni_picks_each_hosts_certificate(edge: Edge) -> None:
    for name, app, body in (
        ("notes.test", edge.a, b"a"),
        ("blog.test", edge.b, b"b"),
        ("www.blog.test", edge.b, b"b"),
    ):
        client = await edge.tls(name)
        expected = edge.serials[name if name != "www.blog.test" else "*.blog.test"]
        assert presented_serial(client.writer.get_extra_info("ssl_object")) == expected
        await client.send(f"GET / HTTP/1.1\r\nhost: {name}\r\n\r\n".encode())
        r = await client.response()
        assert (r.status, r.body) == (200, body)
        assert _forwarded_proto(app) == "https"
        await client.close()


async def test_notes_gets_hsts_on_https_only(edge: Edge) -> None:
    client = await edge.tls("notes.test")
    await client.send(b"GET / HTTP/1.1\r\nhost: notes.test\r\n\r\n")
    r = await client.response()
    assert r.headers["strict-transport-security"] == "max-age=31536000"
    assert r.revision == "v1", "the revision header is still there"
    await client.close()
    plain = await RawClient.open(edge.http_port)
    await plain.send(b"GET / HTTP/1.1\r\nhost: notes.test\r\n\r\n")
    r = await plain.response()
    assert r.status == 200 and "strict-transport-security" not in r.headers
    await plain.close()


async def test_a_host_other_than_the_tls_name_is_misdirected(edge: Edge) -> None:
    client = await edge.tls("notes.test")
    await client.send(b"GET / HTTP/1.1\r\nhost: blog.test\r\n\r\n")
    r = await client.response()
    assert r.status == 421
    assert edge.b.requests == 0
    await client.close()


async def test_a_name_without_a_certificate_gets_no_handshake(edge: Edge) -> None:
    context = edge.ca.client_context()
    assert await handshake_failure(edge.https_port, context, "other.test") != SUCCEEDED
    # and a client that sends no name at all (by IP) gets none either
    context.check_hostname = False
    assert await handshake_failure(edge.https_port, context, None) != SUCCEEDED
    # the listener goes on serving the names it has
    client = await edge.tls("notes.test")
    await client.send(b"GET / HTTP/1.1\r\nhost: notes.test\r\n\r\n")
    assert (await client.response()).status == 200
    await client.close()


SUCCEEDED = "handshake succeeded"


async def handshake_failure(port: int, context: ssl.SSLContext, name: str | None) -> str:
    """Why a TLS handshake with ``name`` as SNI failed, or :data:`SUCCEEDED` (a blocking client
    in a thread: asyncio's streams leave a failed handshake's writer for the garbage collector).
    The server refuses with an ``unrecognized_name`` alert, which asyncio's SSL transport may
    not flush before it closes: the client then sees an EOF instead."""

    def attempt() -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
            try:
                with context.wrap_socket(raw, server_hostname=name):
                    return SUCCEEDED
            except ssl.SSLError as exc:
                return str(exc)

    return await asyncio.to_thread(attempt)


async def test_http_is_redirected_to_https_for_a_service_that_asks(edge: Edge) -> None:
    client = await RawClient.open(edge.http_port)
    await client.send(
        b"POST /a/b?c=1&d HTTP/1.1\r\nhost: Blog.Test:8080\r\ncontent-length: 0\r\n\r\n"
    )
    r = await client.response()
    assert r.status == 308
    assert r.headers["location"] == f"https://blog.test:{edge.https_port}/a/b?c=1&d"
    assert await client.closed_by_peer()
    assert edge.b.requests == 0
    await client.close()
    # the absolute form keeps its path and query too
    client = await RawClient.open(edge.http_port)
    await client.send(b"GET http://x.blog.test?q HTTP/1.1\r\nhost: x.blog.test\r\n\r\n")
    r = await client.response()
    assert r.headers["location"] == f"https://x.blog.test:{edge.https_port}/?q"
    await client.close()


async def test_a_renewed_certificate_serves_new_handshakes_and_keeps_open_connections(
    edge: Edge,
) -> None:
    old = await edge.tls("notes.test")
    await old.send(b"GET / HTTP/1.1\r\nhost: notes.test\r\n\r\n")
    assert (await old.response()).status == 200
    renewed = edge.ca.issue(edge.certs, "notes.test")
    assert renewed != edge.serials["notes.test"]

    fresh = await edge.tls("notes.test")
    assert presented_serial(fresh.writer.get_extra_info("ssl_object")) == renewed
    # the connection made before the renewal keeps going on its own session
    await old.send(b"GET /again HTTP/1.1\r\nhost: notes.test\r\n\r\n")
    again = await old.response()
    assert (again.status, again.body) == (200, b"a")
    assert presented_serial(old.writer.get_extra_info("ssl_object")) == edge.serials["notes.test"]
    await old.close()
    await fresh.close()


async def test_a_broken_renewal_keeps_the_last_good_certificate(edge: Edge) -> None:
    client = await edge.tls("notes.test")  # loads it
    await client.close()
    (edge.certs / "notes.test.key").write_text("not a key\n")
    client = await edge.tls("notes.test")
    serial = presented_serial(client.writer.get_extra_info("ssl_object"))
    assert serial == edge.serials["notes.test"]
    await client.close()
    # and a name whose files never loaded has no certificate at all
    (edge.certs / "new.test.pem").write_text("not a certificate\n")
    (edge.certs / "new.test.key").write_text("not a key\n")
    failure = await handshake_failure(edge.https_port, edge.ca.client_context(), "new.test")
    assert failure != SUCCEEDED


async def test_a_duplicate_host_is_refused_and_changes_nothing(edge: Edge) -> None:
    with pytest.raises(
        ValueError, match=re.escape("notes.test is already served by service 'notes'")
    ):
        edge.http.configure(edge.services(blog_hosts=("blog.test", "notes.test")))
    client = await RawClient.open(edge.http_port)
    await client.send(b"GET / HTTP/1.1\r\nhost: notes.test\r\n\r\n")
    r = await client.response()
    assert (r.status, r.body) == (200, b"a")
    await client.close()


async def test_a_slow_head_on_the_shared_listener_gets_408(upstreams: MakeUpstream) -> None:
    app = await upstreams("a")
    svc = ServiceProxy("notes")
    await svc.start()
    svc.configure({"v1": 100}, [app.backend("v1")])
    listener = EntryListener("http", limits=RouterLimits(head_timeout=0.2))
    port = await listener.start("127.0.0.1", 0)
    listener.configure([ServiceEntry("notes", svc.context, (parse_host_rule("notes.test"),))])
    try:
        client = await RawClient.open(port)
        await client.send(b"GET / HTTP/1.1\r\nhost: notes.test\r\n")  # and never the blank line
        r = await client.response()
        assert r.status == 408
        assert listener.connection_stats()["slow_clients"] == 1
        assert app.requests == 0
        await client.close()
    finally:
        await listener.close()
        await svc.close()


async def test_the_shared_listener_counts_against_the_agents_budget(
    upstreams: MakeUpstream,
) -> None:
    app = await upstreams("a")
    svc = ServiceProxy("notes")
    await svc.start()
    svc.configure({"v1": 100}, [app.backend("v1")])
    listener = EntryListener("http", budget=ConnectionBudget(1))
    port = await listener.start("127.0.0.1", 0)
    listener.configure([ServiceEntry("notes", svc.context, (parse_host_rule("notes.test"),))])
    try:
        first = await RawClient.open(port)
        await first.send(b"GET / HTTP/1.1\r\nhost: notes.test\r\n\r\n")
        assert (await first.response()).status == 200
        second = await RawClient.open(port)
        async with asyncio.timeout(WAIT):
            refused = await second.reader.read()
        assert refused.startswith(b"HTTP/1.1 503 ")
        assert listener.connection_stats()["refused"] == 1
        await first.close()
        await second.close()
    finally:
        await listener.close()
        await svc.close()


def test_names_without_certificates_are_not_remembered(tmp_path: Path) -> None:
    # a client may send any number of made-up server names: none of them may stay in memory
    ca = TestCA(tmp_path / "ca")
    ca.issue(tmp_path / "certs", "notes.test")
    source = DirectoryCertificates(tmp_path / "certs", check_interval=0)
    for i in range(100):
        assert source.context_for(f"made-up-{i}.test") is None
    assert source.context_for("notes.test") is not None
    assert source.cached_names() == ["notes.test"]
