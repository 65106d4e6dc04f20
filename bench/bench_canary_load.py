"""The built-in load step (agent/loading.py): does it deliver the rate asked for, and what does it
cost the agent? ``python bench/run.py canary_load``.

One process, as in the agent: a ``ServiceProxy`` with a stable and a canary backend (90/10), a
keep-alive asyncio HTTP upstream per revision, and a ``LoadRun`` pinned to the canary for
``SECONDS`` at each rate. Reported per rate: what was sent and answered per second, slots missed,
the p99 the router measured for the canary, the process CPU time per request (router, generator
and the test upstreams together, so an upper bound for the generator alone) and how many
requests reached stable (must be 0).
"""

from __future__ import annotations

import asyncio
import os
import resource
import time

import uvloop

from shipyard.agent.loading import LoadRun, LoadSpec
from shipyard.routing.proxy import Backend, ServiceProxy

SECONDS = float(os.environ.get("SHIPYARD_BENCH_LOAD_SECONDS", "5"))
RATES = (20, 200, 1000)
_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class _Upstream:
    def __init__(self) -> None:
        self.requests = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")  # GET: no body
                self.requests += 1
                writer.write(_ANSWER)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _one_rate(rps: int) -> str:
    stable, canary = _Upstream(), _Upstream()
    servers = [await asyncio.start_server(u.serve, "127.0.0.1", 0) for u in (stable, canary)]
    ports = [int(s.sockets[0].getsockname()[1]) for s in servers]
    proxy = ServiceProxy("bench")
    await proxy.start()
    proxy.configure(
        {"canary": 10, "stable": 90},
        [
            Backend("canary-1", "canary", "127.0.0.1", ports[1]),
            Backend("stable-1", "stable", "127.0.0.1", ports[0]),
        ],
    )
    cpu0, t0 = _cpu(), time.monotonic()
    run = LoadRun(proxy, LoadSpec("canary", rps, "/"), host="bench", lease_seconds=SECONDS)
    await run.ended()
    stats = await run.stop()
    elapsed, cpu = time.monotonic() - t0, _cpu() - cpu0
    p99 = proxy.metrics()["canary"].quantile(0.99)
    await proxy.close()
    for s in servers:
        s.close()
    per_request_us = cpu / max(1, stats.answered) * 1e6
    return (
        f"| {rps} | {stats.sent / elapsed:.1f} | {stats.answered / elapsed:.1f} | "
        f"{stats.missed} | {stats.failed} | {p99:.1f} | {per_request_us:.0f} | "
        f"{cpu / elapsed * 100:.1f}% | {stable.requests} |"
    )


async def _all() -> list[str]:
    return [await _one_rate(rps) for rps in RATES]


def main() -> str:
    rows = uvloop.run(_all())
    return (
        "## Canary analysis load step\n\n"
        f"`LoadRun` pinned to the canary through a real `ServiceProxy`, {SECONDS:g} s per rate, "
        "one process (router + generator + two asyncio upstreams answering 2 bytes). CPU is the "
        "whole process's, so it bounds the generator's own cost from above.\n\n"
        "| rps asked | sent/s | answered/s | missed | failed | canary p99 ms (router) | "
        "CPU us/request | CPU | requests at stable |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


if __name__ == "__main__":
    print(main())
