"""Upstream connection pools (routing/pool.py): reuse, caps, retirement, stale connections."""

from __future__ import annotations

import asyncio

from .conftest import MakeClient, MakeProxy, MakeUpstream


async def test_backend_closing_idle_keepalive_connections_causes_no_errors(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    rude = await upstreams("rude", close_after_response=True)
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [rude.backend("v1")])

    async def worker() -> list[int]:
        client = await clients(port)
        statuses = []
        for i in range(25):
            if i % 2:
                statuses.append((await client.request("POST", "/echo", body=b"x" * i)).status)
            else:
                statuses.append((await client.request()).status)
        return statuses

    results = await asyncio.gather(*(worker() for _ in range(4)))
    assert [s for statuses in results for s in statuses] == [200] * 100
    assert proxy.metrics()["v1"].status_5xx == 0


async def test_upstream_connections_are_reused(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [app.backend("v1")])

    async def worker() -> None:
        client = await clients(port)
        for _ in range(50):
            assert (await client.request()).status == 200
        await client.close()

    for _ in range(4):  # new client connections each round, same upstream pool
        await asyncio.gather(*(worker() for _ in range(5)))
    assert app.requests == 1000
    assert app.connections <= 10  # at most a few per concurrent request, never one per request


async def test_idle_connections_per_backend_are_capped(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy, port = await proxies(max_idle_per_backend=2)
    proxy.configure({"v1": 100}, [app.backend("v1")])
    waiting = [await clients(port) for _ in range(5)]
    for client in waiting:  # five requests in flight at once: five upstream connections
        await client.send(b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n")
    await app.wait_until(lambda: app.slow_waiting == 5)
    app.gate.set()
    for client in waiting:
        assert (await client.response()).status == 200
    await app.wait_until(lambda: app.open_connections == 2)  # the rest were closed, not pooled


async def test_removed_backend_idle_connections_are_closed(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    old, new = await upstreams("old"), await upstreams("new")
    proxy, port = await proxies()
    proxy.configure({"old": 100}, [old.backend()])
    client = await clients(port)
    assert (await client.request()).revision == "old"
    assert old.open_connections == 1
    proxy.configure({"new": 100}, [new.backend()])
    await old.wait_until(lambda: old.open_connections == 0)
