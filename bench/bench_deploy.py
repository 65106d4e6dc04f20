"""Zero downtime and rollback speed, measured on the real thing.

Starts ``shipyard serve`` (and its agent) on a fresh data directory with the bundled example app,
then:

- runs wrk through the service URL across several blue-green switches (each retiring the old
  revision while the load runs): failed requests (non-2xx + socket errors) must be 0;
- deploys several broken releases whose health check fails during the bake window and reports
  the time from the unhealthy verdict to 100% of traffic back on the previous revision
  (issue goal: within 1 s; ADR ROLLBACK_TIME_TARGET_MS: 30 s).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console

import wrk_load
from shipyard.cli.demo import Demo, _git, commit_version, make_example_repo

SWITCHES = 4
BROKEN_RELEASES = 5


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

        load = wrk_load.start(url, seconds=8 * SWITCHES + 6)
        time.sleep(2)
        statuses = []
        t0 = time.monotonic()
        for i in range(SWITCHES):
            commit = commit_version(repo, f"v{i + 2}")
            doc = demo.deploy(repo, commit, bake=1, switch_delay=0)
            statuses.append(doc["status"])
            time.sleep(
                3
            )  # the previous revision's warm window (2 s) ends and it is stopped under load
        switching_s = time.monotonic() - t0
        out, _ = load.communicate(timeout=600)
        requests, non2xx, sock, rps = wrk_load.parse(out)

        rollbacks: list[int] = []
        for i in range(BROKEN_RELEASES):
            commit = commit_version(repo, f"broken-{i}", unhealthy_after=1.0)
            doc = demo.deploy(repo, commit, bake=10)
            if doc["status"] != "RolledBack":
                raise RuntimeError(f"broken release ended {doc['status']}: {doc.get('error')}")
            rollbacks.append(int(doc["metrics"]["detection_to_rollback_ms"]))
            commit_version(repo, f"fixed-{i}")  # keep the next broken commit distinct
    finally:
        demo.stop()
        shutil.rmtree(root, ignore_errors=True)

    ok = all(s == "Success" for s in statuses) and non2xx == 0 and sock == 0
    worst = max(rollbacks)
    return (
        "## Blue-green: zero downtime and rollback\n\n"
        "`bench/bench_deploy.py`: `shipyard serve` + agent + the example app (Python http.server), "
        f"wrk `-t2 -c32` through the service URL across {SWITCHES} blue-green switches "
        f"({switching_s:.0f} s), each old revision drained and stopped while the load ran.\n\n"
        "| requests made | non-2xx | socket errors | failed | requests/s | deployments |\n"
        "|---:|---:|---:|---:|---:|---|\n"
        f"| {requests} | {non2xx} | {sock} | **{non2xx + sock}** "
        f"| {rps} | "
        f"{', '.join(statuses)} |\n\n"
        f"Zero downtime: {'**met**' if ok else '**NOT met**'} (target: 0 failed requests).\n\n"
        f"Rollback, {BROKEN_RELEASES} broken releases "
        "(health check failing during the bake window): "
        "time from the unhealthy verdict to 100% of traffic back on the previous revision, "
        "verified through the router: "
        f"min {min(rollbacks)} ms, median {statistics.median(rollbacks):.0f} ms, max {worst} ms "
        f"(goal 1000 ms: {'met' if worst <= 1000 else 'NOT met'}; ADR target 30 000 ms).\n"
    )


if __name__ == "__main__":
    print(main())
