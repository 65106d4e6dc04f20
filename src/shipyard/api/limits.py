"""ASGI middleware refusing what the API will not serve before any route (or authentication)
runs: request bodies over the configured size, declared or streamed (413); too many header lines
(431); more requests in flight than the cap (503).

Installed by ``api.app.create_app``; refuses before any handler runs, so nothing is half-written.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    await self._refuse(send)
                    return
        seen = 0
        refused = False

        async def limited() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    refused = True
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            {
                "error": "body_too_large",
                "title": "Request body too large",
                "status": 413,
                "detail": f"request bodies are limited to {self.max_bytes} bytes",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def _problem(status: int, error: str, title: str, detail: str) -> tuple[bytes, int]:
    body = json.dumps({"error": error, "title": title, "status": status, "detail": detail})
    return body.encode(), status


async def _send_problem(
    send: Send, problem: tuple[bytes, int], extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body, status = problem
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                # The client misbehaved or we are full: do not keep its connection.
                (b"connection", b"close"),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HeaderCountLimit:
    """431 for a request with more than ``max_headers`` header lines, before any route (or
    authentication) sees it. The server's h11 parser already bounds the head's size
    (``Settings.max_head_bytes``), so the headers counted here are at most that many bytes:
    counting them after parsing costs nothing an attacker can grow."""

    def __init__(self, app: ASGIApp, max_headers: int) -> None:
        self.app = app
        self.max_headers = max_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and len(scope.get("headers", ())) > self.max_headers:
            await _send_problem(
                send,
                _problem(
                    431,
                    "too_many_headers",
                    "Too many request header fields",
                    f"requests may carry at most {self.max_headers} header lines",
                ),
            )
            return
        await self.app(scope, receive, send)


class ConcurrencyLimit:
    """A fast 503 (with ``Retry-After``) once ``max_requests`` requests are in flight.

    Counts requests, not connections: uvicorn's own ``limit_concurrency`` counts open
    connections too, so idle sockets (which the request timeout closes anyway) would turn
    every new request into a 503 — the denial of service this cap is meant to prevent."""

    def __init__(self, app: ASGIApp, max_requests: int) -> None:
        self.app = app
        self.max_requests = max_requests
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_requests:
            await _send_problem(
                send,
                _problem(
                    503,
                    "too_many_requests_in_flight",
                    "Server busy",
                    f"{self.max_requests} requests are already in flight; retry shortly",
                ),
                [(b"retry-after", b"1")],
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
