"""What the router forwards (routing/http1.py's rewrite, through routing/client.py), over sockets.

An echo app answers, as JSON, the request line and header fields it received. Through the real
router: every framing case test_http1.py refuses is answered 400 with its reason and
``connection: close`` and the connection is closed, the app seeing nothing; hop-by-hop fields are
dropped, absolute-form targets become origin-form, ``Via``/``X-Forwarded-*`` are set as the
service's ``Forwarding`` says. Then the same requests go through nginx (``proxy_pass`` with the
usual ``proxy_set_header`` lines) in front of the same app, and the app must have seen the same
thing from both, apart from the differences listed in NGINX_DIFFERS (each checked to be real).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shipyard.routing.http1 import Forwarding
from shipyard.routing.proxy import Backend, ServiceProxy

from .conftest import WAIT, MakeClient, MakeProxy, MakeUpstream, RawClient, dead_port, one_app
from .test_http1 import REFUSED

NGINX = Path("/usr/sbin/nginx")

#: (request line, [(lower-case name, value), ...], body) as the echo app received them.
Seen = tuple[str, list[tuple[str, str]], str]


class EchoApp:
    """An HTTP/1.1 keep-alive app that answers what it received, as JSON."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *fields = head[:-4].decode("latin-1").split("\r\n")
                headers = [
                    (n.strip().lower(), v.strip()) for n, _, v in (f.partition(":") for f in fields)
                ]
                length = int(dict(headers).get("content-length", "0"))
                body = (await reader.readexactly(length)).decode("latin-1")
                payload = json.dumps([line, headers, body]).encode()
                # /hop answers with hop-by-hop fields of its own
                hop = b"Connection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n%s"
                    b"content-length: %d\r\n\r\n%s"
                    % (hop if line.startswith("GET /hop ") else b"", len(payload), payload)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def echo() -> AsyncIterator[EchoApp]:
    app = EchoApp()
    await app.start()
    yield app
    await app.stop()


async def seen(client: RawClient, raw: bytes) -> Seen:
    await client.send(raw)
    response = await client.response()
    assert response.status == 200, response
    line, headers, body = json.loads(response.body)
    return line, [(n, v) for n, v in headers], body


# -- framing: 400 and close --------------------------------------------------------------------


@pytest.mark.parametrize("name", REFUSED)
async def test_refused_framing_is_400_with_its_reason_and_closes(
    name: str, upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    head, words = REFUSED[name]
    app, _proxy, client = await one_app(upstreams, proxies, clients)
    await client.send(head + b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")  # never read: closed before
    response = await client.response()
    assert response.status == 400
    assert response.headers["connection"] == "close"
    assert words.decode() in response.body.decode()
    assert await client.closed_by_peer()
    assert app.requests == 0


# -- what reaches the app through the router ---------------------------------------------------


async def _router(echo: EchoApp, forwarding: Forwarding | None = None) -> tuple[ServiceProxy, int]:
    proxy = ServiceProxy("svc", forwarding=forwarding)
    port = await proxy.start()
    proxy.configure({"v1": 100}, [Backend("app-1", "v1", "127.0.0.1", echo.port)])
    return proxy, port


HOP_BY_HOP = (
    b"GET /h HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n"
    b"Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\n"
    b"Proxy-Authorization: Basic eDp5\r\nProxy-Connection: keep-alive\r\nProxy: http://evil\r\n"
    b"X-Kept: yes\r\n\r\n"
)


async def test_the_router_forwards_end_to_end_fields_and_its_own(echo: EchoApp) -> None:
    proxy, port = await _router(echo)
    client = await RawClient.open(port)
    try:
        line, headers, _ = await seen(client, HOP_BY_HOP)
        assert line == "GET /h HTTP/1.1"
        assert headers == [
            ("host", "h"),
            ("trailer", "X-T"),
            ("x-kept", "yes"),
            ("via", "1.1 shipyard"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-for", "127.0.0.1"),
        ]
        absolute = (
            b"GET http://x.example/health?q=1 HTTP/1.1\r\nHost: other\r\n"
            b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 198.51.100.1\r\n"
            b"X-Forwarded-Proto: https\r\nVia: 1.0 edge\r\n\r\n"
        )
        line, headers, _ = await seen(client, absolute)
        # the same head again on this connection: the client reuses the head it built
        assert await seen(client, absolute) == (line, headers, "")
        assert line == "GET /health?q=1 HTTP/1.1"
        assert headers == [
            ("host", "x.example"),
            ("via", "1.0 edge"),
            ("via", "1.1 shipyard"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-for", "203.0.113.7, 198.51.100.1, 127.0.0.1"),
        ]
        # a body is forwarded byte for byte after the rewritten head, on the same connection
        _, headers, body = await seen(
            client, b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTE: x\r\n\r\nhello"
        )
        assert body == "hello"
        assert ("content-length", "5") in headers and "te" not in dict(headers)
    finally:
        await client.close()
        await proxy.close()


async def test_trace_context_reaches_the_app_unchanged(echo: EchoApp) -> None:
    """W3C ``traceparent``/``tracestate`` are end-to-end fields: the app sees each request's
    own, byte for byte, also when the connection's previous request carried another (the
    client reuses a head it built only for the same bytes)."""
    proxy, port = await _router(echo)
    client = await RawClient.open(port)
    parents = [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    ]
    try:
        for parent in parents:
            _, headers, _ = await seen(
                client,
                b"GET /t HTTP/1.1\r\nHost: h\r\ntraceparent: %s\r\n"
                b"TraceState: rojo=00f067aa0ba902b7,congo=t61rcWkgMzE\r\n\r\n" % parent.encode(),
            )
            assert ("traceparent", parent) in headers
            assert ("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE") in headers
            assert [n for n, _ in headers].count("traceparent") == 1
    finally:
        await client.close()
        await proxy.close()


async def test_the_apps_hop_by_hop_fields_do_not_reach_the_client(echo: EchoApp) -> None:
    proxy, port = await _router(echo)
    client = await RawClient.open(port)
    try:
        await client.send(b"GET /hop HTTP/1.1\r\nHost: h\r\n\r\n")
        response = await client.response()
        assert response.status == 200
        assert {"x-hop", "keep-alive", "connection"}.isdisjoint(response.headers)
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-shipyard-revision"] == "v1"
        # and the connection still works, on the same upstream connection
        assert (await seen(client, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"))[0] == "GET / HTTP/1.1"
    finally:
        await client.close()
        await proxy.close()


async def test_forwarding_is_configurable_per_service(echo: EchoApp) -> None:
    forwarding = Forwarding(via=None, x_forwarded_for="replace", x_forwarded_proto="keep")
    proxy, port = await _router(echo, forwarding)
    client = await RawClient.open(port)
    try:
        _, headers, _ = await seen(
            client,
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 6.6.6.6\r\n"
            b"X-Forwarded-Proto: https\r\n\r\n",
        )
        assert headers == [
            ("host", "h"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-for", "127.0.0.1"),
        ]
    finally:
        await client.close()
        await proxy.close()


async def test_a_client_that_closes_is_told_so_and_the_upstream_never_hears_it(
    echo: EchoApp,
) -> None:
    proxy, port = await _router(echo)
    client = await RawClient.open(port)
    try:
        await client.send(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        response = await client.response()
        assert response.headers["connection"] == "close"
        assert "connection" not in dict(json.loads(response.body)[1])
        assert await client.closed_by_peer()
    finally:
        await client.close()
        await proxy.close()


# -- the same requests through nginx -----------------------------------------------------------

#: Requests sent through both. Small and deterministic: one connection each, in order.
COMPARED = {
    "plain": b"GET /a?b=c HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nUser-Agent: t\r\n\r\n",
    "hop-by-hop": HOP_BY_HOP,
    "absolute-form": b"GET http://x.example/health HTTP/1.1\r\nHost: other\r\n\r\n",
    "x-forwarded-for-appended": (
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n"
    ),
    "x-forwarded-for-twice": (
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 203.0.113.7\r\n"
        b"X-Forwarded-For: 198.51.100.1\r\n\r\n"
    ),
    "x-forwarded-proto-replaced": b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\n\r\n",
    "post": b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
}

#: Fields the app sees from one and not the other, on purpose (README, "What the router
#: forwards"): nginx adds no Via, and passes Proxy-* and the fields a client names in Connection
#: on to the app; RFC 9110 section 7.6.1 makes them hop-by-hop, so we do not.
NGINX_DIFFERS = {
    "via": "router only",
    "proxy-authorization": "nginx only",
    "proxy-connection": "nginx only",
    "proxy": "nginx only",
    "x-secret": "nginx only",
}


def _nginx_conf(tmp: Path, port: int, app_port: int) -> Path:
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / sub).mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""daemon on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream app {{ server 127.0.0.1:{app_port}; keepalive 4; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""
    )
    return conf


async def _start_nginx(tmp: Path, app_port: int, port: int) -> Path:
    conf = _nginx_conf(tmp, port, app_port)
    # "daemon on": the command returns once the master has bound its socket, so no polling
    done = await asyncio.to_thread(
        subprocess.run,
        [str(NGINX), "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
        capture_output=True,
        timeout=WAIT,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return conf


def _stop_nginx(tmp: Path, conf: Path) -> None:
    subprocess.run(
        [str(NGINX), "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log"), "-s", "stop"],
        capture_output=True,
        timeout=WAIT,
        check=False,
    )


@pytest.mark.skipif(not NGINX.exists(), reason="nginx is not installed")
async def test_the_app_sees_what_it_sees_behind_nginx(tmp_path: Path, echo: EchoApp) -> None:
    proxy, router_port = await _router(echo)
    nginx_port = dead_port()
    conf = await _start_nginx(tmp_path, echo.port, nginx_port)
    try:
        for name, raw in COMPARED.items():
            views: dict[str, Seen] = {}
            for who, port in (("router", router_port), ("nginx", nginx_port)):
                client = await RawClient.open(port)
                try:
                    views[who] = await seen(client, raw)
                finally:
                    await client.close()
            ours, theirs = views["router"], views["nginx"]
            names = {"router": {n for n, _ in ours[1]}, "nginx": {n for n, _ in theirs[1]}}
            for field, where in NGINX_DIFFERS.items():
                if field in names["router"] | names["nginx"]:
                    assert where == ("router only" if field in names["router"] else "nginx only")
                    assert not (field in names["router"] and field in names["nginx"]), field
                elif name == "hop-by-hop":  # it sends them all: each difference must be real
                    raise AssertionError(f"{field}: seen by neither, drop it from NGINX_DIFFERS")
            kept = [
                (line, [(n, v) for n, v in headers if n not in NGINX_DIFFERS], body)
                for line, headers, body in (ours, theirs)
            ]
            # field order is each proxy's own (nginx puts its proxy_set_header lines first)
            assert (kept[0][0], sorted(kept[0][1]), kept[0][2]) == (
                kept[1][0],
                sorted(kept[1][1]),
                kept[1][2],
            ), name
    finally:
        await asyncio.to_thread(_stop_nginx, tmp_path, conf)
        await proxy.close()
