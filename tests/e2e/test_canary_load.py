"""The built-in load step end to end: ``shipyard serve``, the agent's router, real app processes
and no other traffic at all. With ``analysis.load`` the agent drives the canary through its
router, so a canary nobody visits is still measured: a good one passes, one answering 500s is
rolled back; without the load the same canary cannot be judged (the control case)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx

from shipyard.cli.demo import _git, commit_version
from tests.e2e.support import Server


def first(server: Server, repo: Path) -> str:
    doc = server.wait_final(server.deploy(repo, _git(repo, "rev-parse", "HEAD")))
    assert doc["status"] == "Success", doc.get("error")
    return str(doc["result"]["url"])


def canary(analysis: dict[str, Any]) -> dict[str, Any]:
    stage = {"weight": 20, "duration_seconds": 4, "analysis": analysis}
    return {"Canary": {"stages": [stage], "scale_down_delay_seconds": 1}}


#: One-second windows needing 10 answers: the 20% canary share of no traffic is nothing.
FAST = {"interval_seconds": 1, "min_requests": 10}
# Two-second windows at 40 rps: 80 requests expected against the 10 needed. (CI once saw a
# window of 2 requests between two of 81: a slow metrics read ate the next window, fixed in the
# Analyse executor; tests/orchestrator/test_canary_load.py reproduces it.)
LOAD = {**FAST, "interval_seconds": 2, "load": {"rps": 40, "path": "/"}}


def routed(server: Server) -> dict[str, float]:
    """Requests each revision of ``hello`` has answered, from the control plane's /metrics."""
    assert server.client is not None
    text = server.client.get("/metrics").text
    out: dict[str, float] = {}
    for labels, value in re.findall(
        r'^shipyard_router_requests_total\{([^}]*service="hello"[^}]*)\} (\S+)$', text, re.M
    ):
        revision = re.search(r'revision="([^"]*)"', labels)
        assert revision is not None
        out[revision[1]] = out.get(revision[1], 0.0) + float(value)
    return out


def analysis_stage(doc: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in doc["stages"] if s["name"].startswith("analysis_"))


def test_a_canary_without_traffic_passes_thanks_to_the_load(server: Server, repo: Path) -> None:
    url = first(server, repo)
    v2 = commit_version(repo, "v2")
    before = routed(server)
    doc = server.wait_final(server.deploy_with(repo, v2, canary(LOAD)))
    assert doc["status"] == "Success", doc.get("error")
    stage = analysis_stage(doc)
    measured = stage["detail"]["measurements"]
    assert measured and {m["verdict"] for m in measured} == {"pass"}
    assert all(m["requests"] >= m["needed"] == 10 for m in measured)
    load = stage["detail"]["load"]
    assert (load["revision"], load["rps"], load["path"], load["running"]) == (
        doc["green_revision"],
        40,
        "/",
        False,
    )
    assert load["answered"] > 0 and load["status_5xx"] == 0
    after = routed(server)
    # The load went to the canary only: stable answered nothing more during the deployment.
    assert after.get(doc["blue_revision"], 0.0) == before.get(doc["blue_revision"], 0.0)
    assert after[doc["green_revision"]] >= sum(m["requests"] for m in measured)
    assert httpx.get(url).text == "hello from v2\n"


def test_a_canary_answering_500s_under_the_load_is_rolled_back(server: Server, repo: Path) -> None:
    url = first(server, repo)
    bad = commit_version(repo, "v-5xx", error_rate=1.0)  # /health stays green
    doc = server.wait_final(server.deploy_with(repo, bad, canary(LOAD)))
    assert doc["status"] == "RolledBack", doc.get("error")
    assert doc["error"]["type"] == "AnalysisFailed"
    assert "success rate 0.0000 < min_success_rate" in doc["error"]["message"]
    load = analysis_stage(doc)["detail"]["load"]
    assert load["running"] is False and load["status_5xx"] > 0
    assert server.service()["weights"] == {doc["blue_revision"]: 100}
    assert httpx.get(url).text == "hello from v1\n"


def test_without_the_load_the_same_canary_cannot_be_judged(server: Server, repo: Path) -> None:
    first(server, repo)
    v2 = commit_version(repo, "v2")
    doc = server.wait_final(
        server.deploy_with(repo, v2, canary({**FAST, "insufficient_data": "fail"}))
    )
    assert doc["status"] == "RolledBack"
    message = doc["error"]["message"]
    assert "insufficient data: 0 requests seen, 10 needed (min_requests)" in message
    assert "[analysis] load = { rps = 20 }" in message
