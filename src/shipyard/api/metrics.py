"""``GET /metrics``: Prometheus text exposition (format 0.0.4) of the pipeline and the routers.

Rendered at scrape time from the store (deployments by status, rollbacks) and from each region's
router (per-revision requests, responses by class, upstream errors, in-flight, latency histogram,
current weights), so nothing is double-counted across control-plane restarts: the router's
counters live in the agent. Called by ``api.app``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from shipyard.api.context import AppContext
from shipyard.errors import ShipyardError


def _labels(**labels: str) -> str:
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: list[str] = []

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        text = (
            "+Inf"
            if math.isinf(value)
            else f"{value:g}"
            if isinstance(value, float)
            else str(value)
        )
        self.samples.append(f"{self.name}{suffix}{_labels(**labels) if labels else ''} {text}")

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        yield from self.samples


async def render(ctx: AppContext) -> str:
    deployments = _Family("shipyard_deployments", "gauge", "Deployments by kind and status.")
    for (kind, status), n in sorted((await ctx.store.count_deployments()).items()):
        deployments.add(n, kind=kind, status=status)
    requests = _Family(
        "shipyard_router_requests_total", "counter", "Requests routed, per revision."
    )
    responses = _Family("shipyard_router_responses_total", "counter", "Responses by status class.")
    upstream = _Family(
        "shipyard_router_upstream_errors_total", "counter", "Router-generated 502/504 answers."
    )
    inflight = _Family("shipyard_router_inflight", "gauge", "Requests in flight, per revision.")
    latency = _Family(
        "shipyard_router_request_duration_seconds", "histogram", "Time to the full response."
    )
    weight = _Family("shipyard_router_weight_percent", "gauge", "Share of requests routed.")
    scrape_errors = _Family(
        "shipyard_scrape_errors", "gauge", "Regions whose data plane could not be read."
    )
    for region, runtime in ctx.runtimes.items():
        failed = 0
        try:
            services = await runtime.list_services()
            for service in services:
                state = await runtime.service_state(service)
                for rev, w in (state.weights if state else {}).items():
                    weight.add(w, service=service, region=region, revision=rev)
                per_rev: Mapping[str, Mapping[str, Any]] = await runtime.router.metrics(service)
                for rev, m in per_rev.items():
                    lab = {"service": service, "region": region, "revision": rev}
                    requests.add(m["requests"], **lab)
                    for cls in ("2xx", "3xx", "4xx", "5xx"):
                        responses.add(m[f"status_{cls}"], **lab, code=cls)
                    upstream.add(m["upstream_errors"], **lab)
                    inflight.add(m["inflight"], **lab)
                    cumulative = 0
                    for bound, count in m["latency_ms"]["buckets"].items():
                        cumulative += count
                        le = "+Inf" if bound == "+Inf" else f"{float(bound) / 1000:g}"
                        latency.add(cumulative, "_bucket", **lab, le=le)
                    latency.add(m["latency_ms"]["sum"] / 1000, "_sum", **lab)
                    latency.add(cumulative, "_count", **lab)
        except ShipyardError:
            failed = 1
        scrape_errors.add(failed, region=region)
    families = (
        deployments,
        requests,
        responses,
        upstream,
        inflight,
        latency,
        weight,
        scrape_errors,
    )
    return "\n".join(line for f in families for line in f.render()) + "\n"
