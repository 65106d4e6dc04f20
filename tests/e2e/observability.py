"""Helpers for tests/e2e/test_observability.py and bench/bench_prometheus_abort.py: a real
Prometheus scraping a ``shipyard serve`` with a least-privilege token, and a canary judged by a
PromQL error rate over the routers' series through it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx

from shipyard.cli.token import issue_local
from tests.e2e.support import Server, wait_for_state
from tests.prometheus import PrometheusServer, ScrapeTarget, own_prometheus

#: The candidate's error rate over one measurement window, from Prometheus's copy of the
#: routers' counters (the query README.md shows; ``{{...}}`` are Shipyard's placeholders).
ERROR_RATE = (
    'sum(rate(shipyard_router_responses_total{service="{{service}}",revision="{{canary}}",'
    'code="5xx"}[{{window}}]))'
    ' / sum(rate(shipyard_router_requests_total{service="{{service}}",revision="{{canary}}"}'
    "[{{window}}]))"
)
#: The built-in load on the candidate (agent/loading.py): nobody else visits it.
LOAD = {"rps": 40, "path": "/"}
#: What ``/metrics`` needs, and nothing more (api/app.py's route table).
METRICS_PERMISSIONS = ["deployment:read"]


@contextlib.contextmanager
def scraping(server: Server, scrape_interval: str = "1s") -> Iterator[PrometheusServer]:
    """A Prometheus of our own scraping ``server``'s ``/metrics`` with a token holding only
    ``METRICS_PERMISSIONS``; yielded once its first scrape succeeded."""
    token = issue_local(server.data_dir, "prometheus", METRICS_PERMISSIONS, ttl_seconds=3600)
    target = ScrapeTarget("shipyard", f"127.0.0.1:{server.port}", token=token)
    with own_prometheus([target], scrape_interval=scrape_interval) as prom:
        wait_for_state(
            prom.targets,
            lambda ts: [(t["health"], t["lastError"]) for t in ts] == [("up", "")],
            60,
            "Prometheus to scrape shipyard serve",
        )
        yield prom


def error_rate_metric(prom: PrometheusServer, interval: int) -> dict[str, Any]:
    """``[[analysis.metrics]]`` as the API takes it: ``ERROR_RATE`` through ``prom``, a
    measurement every ``interval`` seconds over a window of the same length."""
    return {
        "name": "error-rate",
        "provider": "prometheus",
        "address": prom.address,
        "query": ERROR_RATE,
        "success_condition": "result < 0.05",
        "failure_condition": "result >= 0.2",
        "interval_seconds": interval,
    }


def promql_canary(
    prom: PrometheusServer, interval: int, seconds: int, *, extensions: int = 6
) -> dict[str, Any]:
    """One canary stage at 20% judged by ``error_rate_metric`` alone (no router check), with
    the built-in load; a window without data yet (the candidate's first scrapes, or scrapes
    late on a loaded machine: rate() needs two samples in the window) extends it."""
    analysis = {
        "interval_seconds": interval,
        "load": LOAD,
        "insufficient_data": "extend",
        "max_extensions": extensions,
        "metrics": [error_rate_metric(prom, interval)],
    }
    stage = {"weight": 20, "duration_seconds": seconds, "analysis": analysis}
    return {"Canary": {"stages": [stage], "scale_down_delay_seconds": 1}}


def error_rate_query(revision: str, window: str, service: str = "hello") -> str:
    """``ERROR_RATE`` with its placeholders filled in, as a person would type it."""
    return (
        ERROR_RATE.replace("{{service}}", service)
        .replace("{{canary}}", revision)
        .replace("{{window}}", window)
    )


def query_range(
    prom: PrometheusServer, promql: str, start: float, end: float, step: float
) -> list[dict[str, Any]]:
    """``/api/v1/query_range``'s ``data.result`` (a matrix); an error answer raises."""
    r = httpx.get(
        f"{prom.address}/api/v1/query_range",
        params={"query": promql, "start": start, "end": end, "step": step},
        timeout=30,
    )
    doc = r.json()
    if r.status_code != 200 or doc.get("status") != "success":
        raise AssertionError(f"query_range {promql!r} failed: {r.status_code} {doc}")
    result: list[dict[str, Any]] = doc["data"]["result"]
    return result
