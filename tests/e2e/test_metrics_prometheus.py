"""A real Prometheus (tests/prometheus.py) scrapes a real ``shipyard serve`` with a bearer token
that holds only ``deployment:read`` — what ``/metrics`` needs, nothing more — and the series are
queried back through Prometheus's HTTP API after two deployments, traffic and a manual rollback:
the routers' per-revision counters and weights, and the ADR section 8 histograms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard.cli.demo import _git, commit_version, make_example_repo
from shipyard.cli.token import issue_local
from tests.e2e.support import Server
from tests.prometheus import ScrapeTarget, available, own_prometheus


def by_revision(result: list[dict[str, Any]]) -> dict[str, float]:
    return {s["metric"]["revision"]: float(s["value"][1]) for s in result}


def one(result: list[dict[str, Any]]) -> float:
    return float(result[0]["value"][1]) if len(result) == 1 else float("nan")


def test_prometheus_scrapes_serve_with_a_read_only_token(server: Server, tmp_path: Path) -> None:
    assert available(), "apt-get install prometheus (scripts/bootstrap.sh does)"
    repo = make_example_repo(tmp_path / "hello-repo")
    read_only = issue_local(server.data_dir, "prometheus", ["deployment:read"], ttl_seconds=3600)
    # Least privilege, and no less: a narrower token is refused (every service's numbers).
    for narrower in (["deployment:read:hello"], ["deployment:create"]):
        token = issue_local(server.data_dir, "narrow", narrower, ttl_seconds=3600)
        r = httpx.get(f"{server.base}/metrics", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 403, (narrower, r.text)

    v1 = server.wait_final(server.deploy(repo, _git(repo, "rev-parse", "HEAD")))
    assert v1["status"] == "Success", v1.get("error")
    v2 = server.wait_final(server.deploy(repo, commit_version(repo, "v2")))
    assert v2["status"] == "Success", v2.get("error")
    url = v2["result"]["url"]
    for _ in range(7):
        assert httpx.get(url).text == "hello from v2\n"
    rb = server.wait_final(server.rollback(v2["id"]))
    assert rb["status"] == "Success", rb.get("error")
    for _ in range(3):
        assert httpx.get(url).text == "hello from v1\n"
    old, new = v1["green_revision"], v2["green_revision"]

    target = ScrapeTarget("shipyard", f"127.0.0.1:{server.port}", token=read_only)
    with own_prometheus([target]) as prom:
        prom.wait_for('up{job="shipyard"}', lambda r: one(r) == 1.0)
        requests = prom.wait_for(
            'shipyard_router_requests_total{service="hello",region="local"}',
            lambda r: by_revision(r).get(new) == 7 and by_revision(r).get(old, 0) >= 3,
        )
        assert set(by_revision(requests)) == {old, new}
        ok = prom.query('shipyard_router_responses_total{service="hello",code="2xx"}')
        assert by_revision(ok)[new] == 7
        weights = prom.query('shipyard_router_weight_ratio{service="hello"}')
        assert by_revision(weights)[old] == 1.0
        latency = prom.query(
            f'shipyard_router_request_duration_seconds_count{{service="hello",revision="{new}"}}'
        )
        assert one(latency) == 7

        where = 'service="hello",region="local"'
        deployed = prom.query(
            "shipyard_deployment_duration_seconds_count"
            f'{{{where},strategy="BlueGreen",status="Success"}}'
        )
        assert one(deployed) == 2
        manual = prom.query(f'shipyard_rollback_duration_seconds_count{{{where},trigger="manual"}}')
        assert one(manual) == 1
        seconds = prom.query(f'shipyard_rollback_duration_seconds_sum{{{where},trigger="manual"}}')
        assert one(seconds) == pytest.approx(rb["metrics"]["rollback_duration_ms"] / 1000)
        # Within the ADR's 30 s: the target is a bucket bound, so PromQL can count against it.
        within = prom.query(
            f'shipyard_rollback_duration_seconds_bucket{{{where},trigger="manual",le="30.0"}}'
        )
        assert one(within) == 1
        health = prom.query(
            f'shipyard_health_check_duration_seconds_count{{{where},outcome="succeeded"}}'
        )
        gates = {h["metric"]["strategy"]: float(h["value"][1]) for h in health}
        # One gate per deployment; the manual rollback has one (series) only when v1 had been
        # scaled down already (a cold rollback): its record says which, and so must the metric.
        cold = sum(
            1 for s in rb["stages"] if s["name"] == "health_check" and s["status"] == "succeeded"
        )
        assert {"BlueGreen": 2, "Rollback": cold} == {"Rollback": 0, **gates}, (gates, rb["stages"])
        builds = prom.query(f"shipyard_build_duration_seconds_count{{{where}}}")
        outcomes = {b["metric"]["outcome"]: float(b["value"][1]) for b in builds}
        assert outcomes == {"succeeded": 2, "failed": 0}  # failed: there at zero, not absent
        now = prom.query(
            'shipyard_deployments_by_strategy{kind="deploy",status="RolledBack",'
            'strategy="BlueGreen"}'
        )
        assert one(now) == 1
