"""The router façade (routing/proxy.py): switching tables under load, drains, lifecycle, CLI.

Over real sockets against conftest.py's upstreams.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import Counter
from collections.abc import Callable

import pytest

from shipyard.routing.proxy import ServiceProxy

from .conftest import WAIT, MakeClient, MakeProxy, MakeUpstream, RawClient


async def test_switch_under_concurrent_load_has_zero_errors_and_old_backend_can_stop(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    old, new = await upstreams("old"), await upstreams("new")
    proxy, port = await proxies()
    proxy.configure({"old": 100}, [old.backend()])
    switched = asyncio.Event()
    stop = asyncio.Event()
    done = Counter[str]()
    progress = asyncio.Condition()
    failures: list[str] = []
    after_switch: Counter[str] = Counter()

    async def worker(n: int) -> None:
        client = await clients(port)
        i = 0
        while not stop.is_set():
            sent_after_switch = switched.is_set()
            if i % 3 == 0:
                response = await client.request("POST", "/echo", body=b"%d" % i)
                ok = response.body == b"%d" % i
            else:
                response = await client.request()
                ok = response.body.decode() == response.revision
            if response.status != 200 or not ok:
                failures.append(f"worker {n}: {response.status} {response.body[:80]!r}")
            if sent_after_switch:
                after_switch[response.revision or "?"] += 1
            async with progress:
                done[response.revision or "?"] += 1
                progress.notify_all()
            i += 1

    async def served(predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT), progress:
            await progress.wait_for(predicate)

    workers = [asyncio.create_task(worker(n)) for n in range(16)]
    try:
        await served(lambda: done["old"] >= 300)
        proxy.configure({"old": 50, "new": 50}, [old.backend(), new.backend()])
        await served(lambda: done["new"] >= 300)
        proxy.configure({"new": 100}, [new.backend()])
        switched.set()
        assert await proxy.drain("old", timeout=WAIT)
        assert proxy.inflight("old") == 0
        await old.stop()  # stopping the old revision must not be visible to anyone
        base = done["new"]
        await served(lambda: done["new"] >= base + 500)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert failures == []
    assert set(after_switch) == {"new"}
    metrics = proxy.metrics()
    assert metrics["old"].status_5xx == metrics["new"].status_5xx == 0
    assert metrics["old"].requests == done["old"]
    # old's pooled connections were closed when it left the table
    await old.wait_until(lambda: old.open_connections == 0)


async def test_slow_request_on_old_revision_finishes_after_the_switch(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    old, new = await upstreams("old"), await upstreams("new")
    proxy, port = await proxies()
    proxy.configure({"old": 100}, [old.backend()])
    slow_client = await clients(port)
    await slow_client.send(b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n")
    await old.wait_until(lambda: old.slow_waiting == 1)
    assert proxy.inflight("old") == 1

    proxy.configure({"new": 100}, [new.backend()])
    assert proxy.weights == {"new": 100}
    assert not await proxy.drain("old", timeout=0.05)  # held by the slow request
    other = await clients(port)
    for _ in range(5):
        assert (await other.request()).revision == "new"
    assert proxy.inflight("old") == 1

    old.gate.set()
    response = await slow_client.response()
    assert (response.status, response.body, response.revision) == (200, b"old", "old")
    assert await proxy.drain("old", timeout=WAIT)
    assert proxy.inflight("old") == 0
    assert (await slow_client.request()).revision == "new"  # same connection, new table
    await old.wait_until(lambda: old.open_connections == 0)  # its connection was not pooled


async def test_drain_of_unknown_or_idle_revision_returns_at_once(proxies: MakeProxy) -> None:
    proxy, _ = await proxies()
    assert await proxy.drain("never-seen", timeout=0)
    assert proxy.inflight() == 0


async def test_drain_replica_waits_for_the_request_that_replica_holds(
    upstreams: MakeUpstream, proxies: MakeProxy, clients: MakeClient
) -> None:
    """One replica leaves a revision that keeps serving (a rolling update): the slow request it
    holds still finishes, and drain_replica returns only then."""
    a, b = await upstreams("a"), await upstreams("b")
    proxy, port = await proxies()
    proxy.configure({"v1": 100}, [a.backend("v1", "r-a"), b.backend("v1", "r-b")])
    slow_client = await clients(port)
    await slow_client.send(b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n")
    await a.wait_until(lambda: a.slow_waiting == 1)  # round-robin sent the first one to r-a

    proxy.configure({"v1": 100}, [b.backend("v1", "r-b")])  # r-a leaves; v1 stays routed
    assert not await proxy.drain_replica("r-b", timeout=0.05)  # still routed: not drainable
    assert not await proxy.drain_replica("r-a", timeout=0.05)  # held by the slow request
    other = await clients(port)
    for _ in range(3):
        assert (await other.request()).body == b"b"
    a.gate.set()
    response = await slow_client.response()
    assert (response.status, response.body) == (200, b"a")
    assert await proxy.drain_replica("r-a", timeout=WAIT)
    assert await proxy.drain_replica("never-routed", timeout=0.05)


async def test_port_in_use_is_a_clear_error(proxies: MakeProxy) -> None:
    _, port = await proxies()
    other = ServiceProxy("other")
    with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{port}.*another process"):
        await other.start("127.0.0.1", port)
    await other.close()


async def test_close_cuts_clients_and_is_idempotent(
    upstreams: MakeUpstream, clients: MakeClient
) -> None:
    app = await upstreams("app")
    proxy = ServiceProxy("svc")
    port = await proxy.start()
    proxy.configure({"v1": 100}, [app.backend("v1")])
    client = await clients(port)
    assert (await client.request()).status == 200
    await proxy.close()
    await proxy.close()
    assert await client.closed_by_peer()
    with contextlib.suppress(ConnectionError):
        refused = await RawClient.open(port)
        assert await refused.closed_by_peer()
        await refused.close()
    await app.wait_until(lambda: app.open_connections == 0)


async def test_command_line_router_serves_and_stops_on_sigterm(upstreams: MakeUpstream) -> None:
    app = await upstreams("app")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shipyard.routing.proxy",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        f"v1=127.0.0.1:{app.port}",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(WAIT):
            line = (await proc.stdout.readline()).decode()
        assert "listening on 127.0.0.1:" in line
        client = await RawClient.open(int(line.rsplit(":", 1)[1]))
        response = await client.request()
        assert (response.status, response.body, response.revision) == (200, b"app", "v1")
        await client.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
        async with asyncio.timeout(WAIT):
            assert await proc.wait() == 0
