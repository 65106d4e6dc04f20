"""A real framework app through its whole life, the way users deploy it, under continuous load.

The bundled ``notes`` example (``shipyard/examples/notes``) is Flask behind gunicorn, two
replicas, with flask and gunicorn installed from PyPI by the build's dependency step; like real
apps it writes at start into its working directory (``instance/``, ``__pycache__``) and $HOME
(``~/.notes``, gunicorn's ``~/.gunicorn`` control socket). ``shipyard serve`` (with its agent)
deploys it, and the ``Recorder`` (support.py) keeps GETting ``/`` through the service URL the
whole time, remembering which version answered each request:

    v1 first deploy -> v2 blue-green -> v3 canary (50%, paused, promoted) -> broken v4 rolled
    back automatically -> instant rollback of v3 to v2, still warm (a failed deployment leaves
    the previous one's warm window alone) -> past the warm window, v2 still serves -> v5 ->
    cold rollbacks, one deployment at a time, to v2 then v1 (each restarted from an artifact
    that has run before) -> a replica killed with SIGKILL is restarted by the agent.

After every step it checks what a user sees: the deployment's final status, the version ``/``
answers, the router's weights (100% on one revision outside a rollout), and that every request
sent since the step ended was answered by that version; at the end, not one failed request.
Run by ``make test`` (the e2e marker); about 70 s here.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from shipyard.cli.demo import _git, commit_version, make_notes_repo
from shipyard.domain.manifest import load_manifest
from tests.e2e.support import Recorder, Server, wait_for_state, wait_until

SERVICE = "notes"
REPLICAS = 2  # [run] replicas in the example's shipyard.toml (checked below)
#: scale_down_delay_seconds of most deployments: their old revision is retired this soon.
WARM = 2
#: v3's: the broken v4 and the instant rollback must both fit inside it, on a slow machine too.
CANARY_WARM = 45
#: Answers a window must hold before it is judged: proof that load reached that state.
SEEN = 30
FAST_ANALYSIS = {"interval_seconds": 1, "min_requests": 20}


@pytest.fixture
def notes_repo(tmp_path: Path) -> Path:
    return make_notes_repo(tmp_path / "notes-repo")


def blue_green(**params: float) -> dict[str, Any]:
    return {
        "BlueGreen": {
            "switch_delay_seconds": 0,
            "bake_seconds": 1,
            "scale_down_delay_seconds": WARM,
            **params,
        }
    }


def final(server: Server, dep_id: str, status: str, what: str) -> dict[str, Any]:
    doc = server.wait_final(dep_id, timeout=120)
    assert doc["status"] == status, f"{what}: {doc['status']}, error: {doc.get('error')}"
    return doc


def build_log(server: Server, dep_id: str) -> str:
    assert server.client is not None
    return str(server.client.get(f"/api/v1/deployments/{dep_id}/logs").json()["text"])


def revisions_running(server: Server) -> set[str]:
    return {r["revision"] for r in server.service(SERVICE)["replicas"]}


def ready_replicas(svc: dict[str, Any], revision: str) -> list[dict[str, Any]]:
    return [r for r in svc["replicas"] if r["revision"] == revision and r["ready"]]


def assert_serves(
    server: Server, rec: Recorder, since: float, version: str, revision: str, what: str
) -> None:
    """After ``what``: 100% on ``revision``, all of its replicas ready, ``/`` answers
    ``version``, every request sent since ``since`` was answered by it, none failed so far."""
    wait_until(
        lambda: len(rec.answers(since=since)) >= SEEN, 30, f"load to reach the service ({what})"
    )
    svc = server.service(SERVICE)
    assert svc["weights"] == {revision: 100}, f"{what}: weights {svc['weights']}"
    assert svc["serving_revision"] == revision, f"{what}: {svc}"
    assert len(ready_replicas(svc, revision)) == REPLICAS, f"{what}: replicas {svc['replicas']}"
    assert httpx.get(svc["url"], timeout=10).text == f"notes {version}\n", what
    bodies = rec.bodies(since=since)
    assert set(bodies) == {f"notes {version}"}, f"{what}: answers since: {dict(bodies)}"
    assert not rec.failures(), f"{what}: {rec.describe_failures()}"


def test_flask_gunicorn_app_deploys_rolls_back_cold_and_heals_under_load_without_a_failed_request(
    server: Server, notes_repo: Path
) -> None:
    repo = notes_repo
    assert load_manifest(repo).run.replicas == REPLICAS

    # --- v1: the service's first deployment; the build installs flask + gunicorn from PyPI ---
    d1 = final(
        server,
        server.deploy_with(repo, _git(repo, "rev-parse", "HEAD"), blue_green(), SERVICE),
        "Success",
        "v1",
    )
    assert "dependency cache miss" in build_log(server, d1["id"])
    r1, url = d1["green_revision"], d1["result"]["url"]
    assert httpx.get(url, timeout=10).text == "notes v1\n"
    rec = Recorder(url, connections=4).start()
    try:
        assert_serves(server, rec, rec.step("v1 serving"), "v1", r1, "v1 first deployment")

        # --- v2 blue-green: a source-only change reuses the cached dependencies ---
        rec.step("v2 blue-green")
        d2_id = server.deploy_with(repo, commit_version(repo, "v2"), blue_green(), SERVICE)
        d2 = final(server, d2_id, "Success", "v2 blue-green")
        r2 = d2["green_revision"]
        assert d2["blue_revision"] == r1
        assert "dependency cache hit" in build_log(server, d2["id"])
        assert_serves(server, rec, rec.step("v2 serving"), "v2", r2, "v2 blue-green")
        wait_until(lambda: revisions_running(server) == {r2}, 30, "v1 to be retired after v2")

        # --- v3 canary: 50% with analysis, paused at the gate, then promoted ---
        rec.step("v3 canary")
        canary = {
            "Canary": {
                "stages": [
                    {"weight": 50, "duration_seconds": 2, "analysis": FAST_ANALYSIS, "pause": True}
                ],
                "scale_down_delay_seconds": CANARY_WARM,
            }
        }
        d3_id = server.deploy_with(repo, commit_version(repo, "v3"), canary, SERVICE)
        wait_until(lambda: server.deployment(d3_id)["status"] == "Paused", 90, "the v3 gate")
        r3 = server.deployment(d3_id)["green_revision"]
        assert server.service(SERVICE)["weights"] == {r3: 50, r2: 50}
        split = rec.step("v3 canary paused at 50%")
        wait_until(
            lambda: (b := rec.bodies(since=split))["notes v2"] >= SEEN and b["notes v3"] >= SEEN,
            30,
            "both v2 and v3 to answer during the 50% stage",
        )
        assert set(rec.bodies(since=split)) == {"notes v2", "notes v3"}
        server.promote(d3_id)
        d3 = final(server, d3_id, "Success", "v3 canary, promoted")
        assert [s["detail"].get("verdict") for s in d3["stages"] if s["name"] == "analysis_1"] == [
            "pass"
        ]
        assert_serves(server, rec, rec.step("v3 serving"), "v3", r3, "v3 promoted")
        svc = server.service(SERVICE)
        assert svc["warm_revision"] == r2 and len(ready_replicas(svc, r2)) == REPLICAS, svc
        warm_until = float(svc["warm_until"])

        # --- broken v4: healthy at first, its health check fails during the bake window ---
        rec.step("broken v4")
        v4 = commit_version(repo, "v4", unhealthy_after=2.0)
        d4_id = server.deploy_with(repo, v4, blue_green(bake_seconds=15), SERVICE)
        d4 = final(server, d4_id, "RolledBack", "broken v4")
        assert d4["error"]["type"] == "HealthCheckFailed", d4["error"]
        assert d4["metrics"]["detection_to_rollback_ms"] is not None, d4["metrics"]
        assert d4["blue_revision"] == r3, d4
        assert_serves(server, rec, rec.step("v3 serving again"), "v3", r3, "v4 rolled back")
        svc = server.service(SERVICE)
        assert svc["warm_revision"] == r2, f"v4's failure must leave v2 warm: {svc}"
        wait_until(lambda: revisions_running(server) == {r2, r3}, 30, "v4 to be stopped")

        # --- instant rollback of v3 inside its warm window: v2 is still running ---
        assert time.time() < warm_until - 1, "the test is too slow for CANARY_WARM: raise it"
        rec.step("instant rollback of v3")
        rb1 = final(server, server.rollback(d3_id), "Success", "instant rollback of v3")
        assert rb1["strategy"] == {"Rollback": {"instant": True}}, rb1["strategy"]
        assert server.deployment(d3_id)["status"] == "RolledBack"
        assert_serves(server, rec, rec.step("v2 serving again"), "v2", r2, "instant rollback")

        # --- past v3's warm window (and a janitor pass or two), v2 must still serve ---
        def v2_serves_until_the_window_has_passed() -> bool:
            svc = server.service(SERVICE)
            assert svc["weights"] == {r2: 100}, f"past v3's warm window: {svc}"
            assert len(ready_replicas(svc, r2)) == REPLICAS, f"past v3's warm window: {svc}"
            return time.time() > warm_until + 3  # the janitor runs every second

        wait_until(v2_serves_until_the_window_has_passed, CANARY_WARM + 60, "the window to pass")
        assert_serves(server, rec, rec.step("v2 serving"), "v2", r2, "past the warm window")
        wait_until(lambda: revisions_running(server) == {r2}, 30, "v3 to be stopped")

        # --- v5: the next deployment starts from v2 as its stable revision ---
        rec.step("v5 blue-green")
        d5_id = server.deploy_with(repo, commit_version(repo, "v5"), blue_green(), SERVICE)
        d5 = final(server, d5_id, "Success", "v5 blue-green")
        assert d5["blue_revision"] == r2, d5
        r5 = d5["green_revision"]
        assert_serves(server, rec, rec.step("v5 serving"), "v5", r5, "v5 blue-green")
        wait_until(lambda: revisions_running(server) == {r5}, 30, "v2 to be retired after v5")

        # --- cold rollbacks, one deployment at a time: v5 -> v2 -> v1 ---
        rec.step("cold rollback of v5")
        rb2 = final(server, server.rollback(d5["id"]), "Success", "cold rollback of v5 to v2")
        assert rb2["strategy"] == {"Rollback": {"instant": False}}, rb2["strategy"]
        assert "health_check" in [s["name"] for s in rb2["stages"]]
        assert_serves(server, rec, rec.step("v2 serving, cold"), "v2", r2, "cold rollback to v2")
        rec.step("cold rollback of v2")
        rb3 = final(server, server.rollback(d2["id"]), "Success", "cold rollback of v2 to v1")
        assert rb3["strategy"] == {"Rollback": {"instant": False}}, rb3["strategy"]
        assert "health_check" in [s["name"] for s in rb3["stages"]]
        assert_serves(server, rec, rec.step("v1 serving, cold"), "v1", r1, "cold rollback to v1")
        wait_until(lambda: revisions_running(server) == {r1}, 30, "only v1 left running")

        # --- a replica killed with SIGKILL is restarted by the agent within seconds ---
        victim = ready_replicas(server.service(SERVICE), r1)[0]
        rec.step("SIGKILL of a v1 replica")
        os.kill(int(victim["pid"]), signal.SIGKILL)

        def v1_replicas() -> list[dict[str, Any]]:
            return [r for r in server.service(SERVICE)["replicas"] if r["revision"] == r1]

        def restarted(replicas: list[dict[str, Any]]) -> bool:
            ready = [r for r in replicas if r["ready"]]
            return (
                len(replicas) == len(ready) == REPLICAS
                and victim["pid"] not in {r["pid"] for r in ready}
                and any(r.get("restarts", 0) >= 1 for r in replicas)
            )

        wait_for_state(
            v1_replicas, restarted, 20, "the killed replica restarted (new pid, restarts >= 1)"
        )
        assert_serves(server, rec, rec.step("v1 serving, healed"), "v1", r1, "replica restarted")
    finally:
        rec.stop()

    answers = rec.answers()
    assert len(answers) > 2000, f"only {len(answers)} requests: the load did not run"
    assert not rec.failures(), rec.describe_failures()
    by_revision: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for a in answers:
        by_revision[a.revision][a.body] += 1
    assert all(len(bodies) == 1 for bodies in by_revision.values()), dict(by_revision)
