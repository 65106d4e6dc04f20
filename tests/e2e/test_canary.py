"""Canary end to end: ``shipyard serve``, the agent's router, real app processes, wrk load.

The analysis reads the router's own per-revision metrics; the bad releases keep a green health
check (they fail only on real requests), so only the analysis can catch them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from shipyard.cli.demo import _git, commit_version
from tests.e2e.support import Server, Wrk, wait_until

FAST = {"interval_seconds": 1, "min_requests": 20}


def deploy(server: Server, repo: Path, commit: str, strategy: dict[str, Any]) -> str:
    assert server.client is not None
    r = server.client.post(
        "/api/v1/deploy",
        json={
            "source": {"repository": str(repo), "branch": "main", "commit": commit},
            "target": {"service_name": "hello", "region": "local"},
            "strategy": strategy,
        },
    )
    assert r.status_code == 202, r.text
    return str(r.json()["deployment_id"])


def first(server: Server, repo: Path) -> str:
    doc = server.wait_final(deploy(server, repo, _git(repo, "rev-parse", "HEAD"), bg()))
    assert doc["status"] == "Success", doc.get("error")
    return str(doc["result"]["url"])


def bg() -> dict[str, Any]:
    return {"BlueGreen": {"switch_delay_seconds": 0, "bake_seconds": 0}}


def canary(*stages: dict[str, Any]) -> dict[str, Any]:
    return {"Canary": {"stages": list(stages), "scale_down_delay_seconds": 1}}


def verdicts(doc: dict[str, Any]) -> list[str]:
    return [
        m["verdict"]
        for s in doc["stages"]
        if s["name"].startswith("analysis_")
        for m in s["detail"].get("measurements", [])
    ]


def test_healthy_canary_with_a_gate_is_promoted_with_zero_failed_requests(
    server: Server, repo: Path
) -> None:
    url = first(server, repo)
    v2 = commit_version(repo, "v2")
    before = server.router_requests()
    load = Wrk(url, seconds=20, connections=8)
    server.wait_for_traffic(before)
    dep = deploy(
        server,
        repo,
        v2,
        canary(
            {"weight": 20, "duration_seconds": 3, "analysis": FAST, "pause": True},
            {"weight": 50, "duration_seconds": 3, "analysis": FAST},
        ),
    )
    wait_until(lambda: server.deployment(dep)["status"] == "Paused", 60, "the stage-1 gate")
    svc = server.service()
    doc = server.deployment(dep)
    assert svc["weights"] == {doc["green_revision"]: 20, doc["blue_revision"]: 80}
    assert server.client is not None
    r = server.client.post(f"/api/v1/deployments/{dep}/promote")
    assert r.status_code == 202, r.text
    doc = server.wait_final(dep)
    assert doc["status"] == "Success", doc.get("error")
    result = load.result()
    assert result.requests > 100, result.output
    assert result.failed == 0, result.output
    assert verdicts(doc) and "fail" not in verdicts(doc)
    analysed = [s for s in doc["stages"] if s["name"].startswith("analysis_")]
    assert [s["detail"]["verdict"] for s in analysed] == ["pass", "pass"]
    assert httpx.get(url).text == "hello from v2\n"
    audit = server.client.get(f"/api/v1/deployments/{dep}/audit").json()["records"]
    events = [r["event_type"] for r in audit]
    assert "deployment.promoted" in events and events.count("analysis.passed") == 2


def test_canary_returning_5xx_is_aborted_by_analysis(server: Server, repo: Path) -> None:
    url = first(server, repo)
    bad = commit_version(repo, "v-5xx", error_rate=0.3)
    before = server.router_requests()
    load = Wrk(url, seconds=30, connections=8)
    server.wait_for_traffic(before)
    dep = deploy(
        server, repo, bad, canary({"weight": 30, "duration_seconds": 20, "analysis": FAST})
    )
    doc = server.wait_final(dep)
    load.proc.terminate()
    load.proc.communicate(timeout=30)
    assert doc["status"] == "RolledBack"
    assert doc["error"]["type"] == "AnalysisFailed"
    assert "success rate" in doc["error"]["message"]
    assert verdicts(doc)[-1] == "fail"
    assert doc["metrics"]["abort_latency_ms"] < 1000  # failing verdict -> canary weight 0
    svc = server.service()
    assert svc["weights"] == {doc["blue_revision"]: 100}
    assert {r["revision"] for r in svc["replicas"]} == {doc["blue_revision"]}
    assert httpx.get(url).text == "hello from v1\n"


def test_slow_canary_is_aborted_on_latency(server: Server, repo: Path) -> None:
    url = first(server, repo)
    slow = commit_version(repo, "v-slow", delay_ms=300)
    before = server.router_requests()
    load = Wrk(url, seconds=30, connections=16)
    server.wait_for_traffic(before)
    analysis = {**FAST, "max_p99_latency_ms": 150, "min_requests": 10}
    dep = deploy(
        server, repo, slow, canary({"weight": 50, "duration_seconds": 20, "analysis": analysis})
    )
    doc = server.wait_final(dep)
    load.proc.terminate()
    load.proc.communicate(timeout=30)
    assert doc["status"] == "RolledBack", doc.get("error")
    assert "p99" in doc["error"]["message"]
    assert server.service()["weights"] == {doc["blue_revision"]: 100}


def test_abort_endpoint_rolls_a_paused_canary_back(server: Server, repo: Path) -> None:
    first(server, repo)
    v2 = commit_version(repo, "v2")
    dep = deploy(
        server, repo, v2, canary({"weight": 10, "pause": True, "analysis": {"enabled": False}})
    )
    wait_until(lambda: server.deployment(dep)["status"] == "Paused", 60, "the gate")
    assert server.client is not None
    r = server.client.post(f"/api/v1/deployments/{dep}/abort")
    assert r.status_code == 202, r.text
    doc = server.wait_final(dep)
    assert doc["status"] == "RolledBack"
    assert doc["error"]["type"] == "DeploymentAborted"
    assert server.service()["weights"] == {doc["blue_revision"]: 100}
