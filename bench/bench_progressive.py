"""Canary and rolling under steady load, and canary abort latency, measured on the real thing.

Starts ``shipyard serve`` (and its agent) on a fresh data directory with the bundled example app,
then:

- runs wrk through the service URL across several canary promotions (20% -> 50% -> 100%, each
  stage judged by analysis of the router's metrics): failed requests must be 0;
- scales the service to 4 replicas and runs wrk across several rolling updates (max_surge 1,
  max_unavailable 25%): failed requests must be 0;
- deploys canaries answering 5xx on half their requests and reports the time from the failing
  analysis verdict to canary weight 0 verified on the router (issue goal: within 1 s).

Run by ``bench/run.py progressive``; ``main()`` returns the Markdown section.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

import wrk_load
from shipyard.cli.demo import Demo, _git, commit_version, make_example_repo, set_replicas

CANARIES = 3
ROLLING_UPDATES = 3
BAD_CANARIES = 5
ANALYSIS = {"interval_seconds": 1, "min_requests": 20, "min_success_rate": 0.99}


def _canary(*weights: int, seconds: float = 2) -> dict[str, Any]:
    stages = [{"weight": w, "duration_seconds": seconds, "analysis": ANALYSIS} for w in weights]
    return {"Canary": {"stages": stages, "scale_down_delay_seconds": 1}}


def _under_load(
    url: str, seconds: int, deploys: list[tuple[str, dict[str, Any]]], demo: Demo, repo: Path
) -> tuple[list[str], tuple[int, int, int, str], float]:
    load = wrk_load.start(url, seconds)
    time.sleep(2)
    t0 = time.monotonic()
    statuses = []
    for commit, strategy in deploys:
        doc = demo.deploy_with(repo, commit, strategy)
        statuses.append(doc["status"])
        time.sleep(2)  # the previous revision is retired (stopped) while the load runs
    elapsed = time.monotonic() - t0
    out, _ = load.communicate(timeout=900)
    return statuses, wrk_load.parse(out), elapsed


def main() -> str:
    root = Path(tempfile.mkdtemp(prefix="shipyard-bench-"))
    demo = Demo(root / "data", 0, Console(stderr=True, quiet=True))
    demo.data_dir.mkdir(parents=True)
    try:
        demo.start_server()
        repo = make_example_repo(root / "repo")
        first = demo.deploy(repo, _git(repo, "rev-parse", "HEAD"), bake=0)
        assert first["status"] == "Success", first.get("error")
        url = first["result"]["url"]

        canaries = [(commit_version(repo, f"c{i}"), _canary(20, 50)) for i in range(CANARIES)]
        c_status, c_load, c_s = _under_load(url, 14 * CANARIES + 6, canaries, demo, repo)

        set_replicas(repo, 4)
        four = demo.deploy(repo, commit_version(repo, "r0"), bake=0)
        assert four["status"] == "Success", four.get("error")
        rolling = {"Rolling": {"max_surge": 1, "max_unavailable": "25%"}}
        updates = [(commit_version(repo, f"r{i + 1}"), rolling) for i in range(ROLLING_UPDATES)]
        r_status, r_load, r_s = _under_load(url, 12 * ROLLING_UPDATES + 6, updates, demo, repo)

        set_replicas(repo, 1)
        demo.deploy(repo, commit_version(repo, "base"), bake=0)
        load = wrk_load.start(url, 25 * BAD_CANARIES)
        aborts: list[int] = []
        for i in range(BAD_CANARIES):
            bad = commit_version(repo, f"bad-{i}", error_rate=0.5)
            doc = demo.deploy_with(repo, bad, _canary(30, seconds=10))
            if doc["status"] != "RolledBack":
                raise RuntimeError(f"bad canary ended {doc['status']}: {doc.get('error')}")
            aborts.append(int(doc["metrics"]["abort_latency_ms"]))
        load.terminate()
        load.communicate(timeout=30)
    finally:
        demo.stop()
        shutil.rmtree(root, ignore_errors=True)

    def row(what: str, statuses: list[str], figures: tuple[int, int, int, str], s: float) -> str:
        requests, non2xx, sock, rps = figures
        return (
            f"| {what} | {requests} | {non2xx} | {sock} | **{non2xx + sock}** | {rps} | "
            f"{s:.0f} s | {', '.join(statuses)} |\n"
        )

    ok = (
        all(s == "Success" for s in c_status + r_status)
        and c_load[1] + c_load[2] == 0
        and r_load[1] + r_load[2] == 0
    )
    worst = max(aborts)
    return (
        "## Canary and rolling\n\n"
        "`bench/bench_progressive.py`: `shipyard serve` + agent + the example app (Python "
        "http.server), wrk `-t2 -c32` through the service URL. Canary: stages 20% and 50% of 2 s "
        "each, judged every second on the router's per-revision metrics (success rate >= 0.99, "
        "at least 20 responses per window), then promoted; rolling: 4 replicas, max_surge 1, "
        "max_unavailable 25%, weights proportional to ready replicas, old replicas drained and "
        "stopped under load.\n\n"
        "| rollouts | requests made | non-2xx | socket errors | failed | requests/s | "
        "rollout time | deployments |\n"
        "|---|---:|---:|---:|---:|---:|---:|---|\n"
        + row(f"{CANARIES} canary promotions", c_status, c_load, c_s)
        + row(f"{ROLLING_UPDATES} rolling updates (4 replicas)", r_status, r_load, r_s)
        + f"\nZero failed requests: {'**met**' if ok else '**NOT met**'}.\n\n"
        f"Abort latency, {BAD_CANARIES} canaries answering 5xx on 50% of requests at 30%: "
        "from the failing analysis verdict to canary weight 0 verified on the router: "
        f"min {min(aborts)} ms, median {statistics.median(aborts):.0f} ms, max {worst} ms "
        f"(goal 1000 ms: {'met' if worst <= 1000 else 'NOT met'}).\n"
    )


if __name__ == "__main__":
    print(main())
