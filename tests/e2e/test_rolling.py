"""Rolling updates end to end: 4 replicas behind the agent's router, wrk load, and a watcher
reading ``GET /api/v1/services/hello`` to check the invariants at every observation."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx

from shipyard.cli.demo import commit_version, set_replicas
from tests.e2e.support import Server, Wrk

DESIRED, SURGE, UNAVAILABLE = 4, 1, 1


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


ROLLING = {"Rolling": {"max_surge": SURGE, "max_unavailable": "25%"}}


class Watcher:
    """Polls the service's replicas until stopped; keeps (running, ready) per observation."""

    def __init__(self, server: Server) -> None:
        assert server.client is not None
        self.client = httpx.Client(base_url=server.base, headers=server.client.headers, timeout=5)
        self.seen: list[tuple[int, int, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            svc = self.client.get("/api/v1/services/hello").json()
            alive = [r for r in svc["replicas"] if r["state"] in ("starting", "running")]
            ready = [r for r in alive if r["ready"]]
            self.seen.append((len(alive), len(ready), svc["weights"]))
            time.sleep(0.02)

    def stop(self) -> list[tuple[int, int, dict[str, int]]]:
        self._stop.set()
        self._thread.join(10)
        self.client.close()
        return self.seen


def four_replicas(server: Server, repo: Path) -> str:
    set_replicas(repo, DESIRED)
    v1 = commit_version(repo, "v1")
    doc = server.wait_final(
        deploy(server, repo, v1, {"BlueGreen": {"switch_delay_seconds": 0, "bake_seconds": 0}})
    )
    assert doc["status"] == "Success", doc.get("error")
    assert len(server.service()["replicas"]) == DESIRED
    return str(doc["result"]["url"])


def test_rolling_update_of_4_replicas_with_zero_failed_requests(server: Server, repo: Path) -> None:
    url = four_replicas(server, repo)
    v2 = commit_version(repo, "v2")
    before = server.router_requests()
    load = Wrk(url, seconds=12, connections=8)
    server.wait_for_traffic(before)
    watcher = Watcher(server)
    doc = server.wait_final(deploy(server, repo, v2, ROLLING))
    seen = watcher.stop()
    result = load.result()
    assert doc["status"] == "Success", doc.get("error")
    assert result.requests > 100 and result.failed == 0, result.output
    assert len(seen) > 20
    for running, ready, _ in seen:
        assert running <= DESIRED + SURGE, seen
        assert ready >= DESIRED - UNAVAILABLE, seen
    assert any(len(w) == 2 for _, _, w in seen)  # traffic was shared while rolling
    svc = server.service()
    assert {r["revision"] for r in svc["replicas"]} == {doc["green_revision"]}
    assert sum(r["ready"] for r in svc["replicas"]) == DESIRED
    assert httpx.get(url).text == "hello from v2\n"


def test_rolling_update_whose_new_revision_never_gets_healthy(server: Server, repo: Path) -> None:
    url = four_replicas(server, repo)
    broken = commit_version(repo, "v-broken", unhealthy_after=0)
    load = Wrk(url, seconds=6, connections=4, threads=1)
    watcher = Watcher(server)
    doc = server.wait_final(deploy(server, repo, broken, ROLLING))
    seen = watcher.stop()
    result = load.result()
    assert doc["status"] == "RolledBack"
    assert doc["error"]["type"] == "HealthCheckFailed"
    assert result.failed == 0, result.output
    for running, ready, _ in seen:
        assert running <= DESIRED + SURGE, seen
        assert ready >= DESIRED - UNAVAILABLE, seen
    svc = server.service()
    assert svc["weights"] == {doc["blue_revision"]: 100}
    replicas = svc["replicas"]
    assert {r["revision"] for r in replicas} == {doc["blue_revision"]}
    assert sum(r["ready"] for r in replicas) == DESIRED  # the full replica count
    assert httpx.get(url).text == "hello from v1\n"
