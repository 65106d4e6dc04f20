"""Soak benchmark: the router at high concurrency with slowloris mixed in, HAProxy beside it.

``python bench/run.py soak``. nginx is the app (as in bench_router.py); in front of it the
Shipyard router (``python -m shipyard.routing.proxy`` with its default limits: head 10 s,
keep-alive 60 s, 4,096 connections) and HAProxy with the equivalent settings (``timeout
http-request 10s``, ``timeout http-keep-alive 60s``, ``timeout client 60s``, ``maxconn 4096``,
``http-reuse safe``). For each, wrk drives legitimate keep-alive clients (``-c200``) once alone
and once with slowloris attackers mixed in: 500 sockets from a separate process, each sending a
request head one byte every two seconds and reconnecting whenever the server cuts it (bounded in
time and count, loopback only). Reported: the legitimate clients' success rate, requests/s, p50
and p99 side by side, how often the attackers were cut, and the router's memory before and
during the attack (what an idle socket costs it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import bench_router as br

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("SHIPYARD_BENCH_SOAK_ROUNDS", "2"))
DURATION_S = 10
CONNECTIONS = 200
ATTACKERS = 500
ATTACKER_LIMIT = 2000  # the attack script refuses more: this is a soak, not a load test of the host
DRIP_S = 2.0
HEAD_TIMEOUT_S = 10
KEEPALIVE_S = 60
MAXCONN = 4096


@dataclass
class Result:
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    cut: int = 0  # attacker connections the server closed
    rss_kib: int = 0  # the proxy's resident memory at the end of the run

    @property
    def success(self) -> float:
        attempts = self.requests + self.errors
        return (self.requests - self.errors) / attempts if attempts else 0.0


def wrk(url: str) -> Result:
    out = subprocess.run(
        [
            br.WRK,
            "-t1",
            f"-c{CONNECTIONS}",
            f"-d{DURATION_S}s",
            "--timeout",
            "5s",
            "--latency",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=DURATION_S + 30,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m[1])
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    return Result(
        requests,
        errors,
        float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),  # type: ignore[index]
        br.parse_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M)[1]),  # type: ignore[index]
        br.parse_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M)[1]),  # type: ignore[index]
    )


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_once(url: str, port: int, pid: int, attack: bool) -> Result:
    """One wrk run against ``url``, with or without slowloris on ``port`` during it."""
    if not attack:
        result = wrk(url)
        result.rss_kib = rss_kib(pid)
        return result
    seconds = DURATION_S + 4
    loris = subprocess.Popen(
        [sys.executable, __file__, "--slowloris", str(port), str(ATTACKERS), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)  # the attackers are in place before the legitimate load starts
        result = wrk(url)
        result.rss_kib = rss_kib(pid)
        out, _ = loris.communicate(timeout=seconds + 30)
    finally:
        if loris.poll() is None:
            loris.kill()
            loris.wait()
    result.cut = int(json.loads(out.strip().splitlines()[-1])["cut"])
    return result


def write_haproxy_conf(tmp: Path, port: int, backend_port: int) -> Path:
    conf = tmp / "haproxy-soak.cfg"
    conf.write_text(
        f"""global
    maxconn {MAXCONN}

defaults
    mode http
    option http-keep-alive
    http-reuse safe
    maxconn {MAXCONN}
    timeout connect 2s
    timeout http-request {HEAD_TIMEOUT_S}s
    timeout http-keep-alive {KEEPALIVE_S}s
    timeout client {KEEPALIVE_S}s
    timeout server 60s

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server nginx 127.0.0.1:{backend_port}
"""
    )
    return conf


def main() -> str:
    taken: set[int] = set()
    nginx_port, haproxy_port, router_port = (br.free_port(taken) for _ in range(3))
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="shipyard-soak-")))
        nginx_conf = br.write_nginx_conf(tmp, nginx_port)
        nginx = br.start(
            stack,
            [br.NGINX, "-p", str(tmp), "-c", str(nginx_conf), "-e", "stderr"],
            tmp / "nginx.out",
        )
        br.wait_port(nginx_port, nginx, "nginx", tmp / "nginx.out")
        haproxy = br.start(
            stack,
            [br.HAPROXY, "-db", "-f", str(write_haproxy_conf(tmp, haproxy_port, nginx_port))],
            tmp / "haproxy.out",
        )
        br.wait_port(haproxy_port, haproxy, "haproxy", tmp / "haproxy.out")
        router = br.start(
            stack,
            [sys.executable, "-m", "shipyard.routing.proxy", "--listen",
             f"127.0.0.1:{router_port}", "--backend", f"v1=127.0.0.1:{nginx_port}",
             "--head-timeout", str(HEAD_TIMEOUT_S), "--keepalive-timeout", str(KEEPALIVE_S),
             "--max-connections", str(MAXCONN)],
            tmp / "router.out",
            env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
        )  # fmt: skip
        br.wait_port(router_port, router, "router", tmp / "router.out")
        targets = {
            "Shipyard router": (router_port, router.pid),
            "HAProxy": (haproxy_port, haproxy.pid),
        }
        for port, _ in targets.values():  # warm up
            subprocess.run(
                [br.WRK, "-t1", "-c50", "-d2s", f"http://127.0.0.1:{port}/"],
                capture_output=True,
                check=True,
            )
        idle_rss = rss_kib(router.pid)
        results: dict[tuple[str, bool], list[Result]] = {}
        names = list(targets)
        for i in range(ROUNDS):
            order = names[i % 2 :] + names[: i % 2]  # alternate who goes first
            for name in order:
                port, pid = targets[name]
                for attack in (False, True):
                    url = f"http://127.0.0.1:{port}/"
                    results.setdefault((name, attack), []).append(run_once(url, port, pid, attack))
        for what, proc in (("router", router), ("haproxy", haproxy), ("nginx", nginx)):
            if proc.poll() is not None:
                raise RuntimeError(f"{what} died during the soak (exit {proc.returncode})")
    return report(results, idle_rss)


def report(results: dict[tuple[str, bool], list[Result]], idle_rss: int) -> str:
    def med(runs: list[Result], attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in runs))

    rows = []
    for (name, attack), runs in results.items():
        rows.append(
            f"| {name} | {f'{ATTACKERS} slowloris' if attack else 'none'} "
            f"| {med(runs, 'success') * 100:.2f} % | {med(runs, 'rps'):,.0f} "
            f"| {med(runs, 'p50_ms'):.2f} | {med(runs, 'p99_ms'):.2f} "
            f"| {med(runs, 'cut'):.0f} | {med(runs, 'rss_kib') / 1024:.1f} |"
        )
    router_attacked = results[("Shipyard router", True)]
    per_socket = (med(router_attacked, "rss_kib") - idle_rss) / ATTACKERS
    return f"""## Soak: slowloris mixed into high concurrency (router vs HAProxy)

wrk (`-t1 -c{CONNECTIONS} -d{DURATION_S}s --timeout 5s`, keep-alive) through the Shipyard router
(its defaults: head timeout {HEAD_TIMEOUT_S} s, keep-alive {KEEPALIVE_S} s, {MAXCONN} connections)
and HAProxy (`timeout http-request {HEAD_TIMEOUT_S}s`, `timeout http-keep-alive {KEEPALIVE_S}s`,
`timeout client {KEEPALIVE_S}s`, `maxconn {MAXCONN}`, `http-reuse safe`), both in front of the same
nginx, each run alone and with {ATTACKERS} slowloris sockets (a separate process; each sends a
request head one byte every {DRIP_S:g} s from 3 s before wrk starts, and reconnects when cut).
Median of {ROUNDS} rounds, contenders alternated. "Cut" counts attacker connections the server
closed during the run (the head timeout at work); memory is the proxy's RSS at the end of the run.

| proxy | attackers | legitimate success | requests/s | p50 ms | p99 ms | attackers cut | RSS MiB |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

The router's RSS idle: {idle_rss / 1024:.1f} MiB; each slowloris socket held costs it about
{per_socket:.1f} KiB. That is why the agent keeps every service's router in one process with
separate caps rather than a process per service: a process costs its interpreter's resident
memory again per service, where a thousand idle sockets cost a few MiB, and an idle socket costs
no CPU (epoll), only a descriptor, which the descriptor limit (raised to the hard maximum) and the
caps bound.
"""


# -- the attackers (a separate process, so their work does not share the bench's loop) ------------


async def _loris(port: int, stop_at: float, counts: dict[str, int]) -> None:
    await asyncio.sleep(random.uniform(0, DRIP_S))  # not all in step
    while time.monotonic() < stop_at:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["refused"] += 1
            await asyncio.sleep(DRIP_S)
            continue
        counts["opened"] += 1
        closed = asyncio.ensure_future(reader.read())
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: loris\r\n")
            while time.monotonic() < stop_at:
                done, _ = await asyncio.wait({closed}, timeout=DRIP_S)
                if done:
                    counts["cut"] += 1
                    break
                writer.write(b"x")
                await writer.drain()
        except OSError:
            counts["cut"] += 1
        finally:
            closed.cancel()
            writer.close()


async def _slowloris(port: int, count: int, seconds: float) -> dict[str, int]:
    counts = {"opened": 0, "cut": 0, "refused": 0}
    stop_at = time.monotonic() + seconds
    await asyncio.gather(*(_loris(port, stop_at, counts) for _ in range(count)))
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="slowloris against 127.0.0.1 (bench only)")
    parser.add_argument("--slowloris", nargs=3, metavar=("PORT", "COUNT", "SECONDS"), type=float)
    args = parser.parse_args()
    port, count, seconds = args.slowloris
    if not 0 < count <= ATTACKER_LIMIT or not 0 < seconds <= 120:
        raise SystemExit(f"at most {ATTACKER_LIMIT} sockets for at most 120 s")
    print(json.dumps(asyncio.run(_slowloris(int(port), int(count), seconds))), flush=True)
