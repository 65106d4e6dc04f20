"""Record the documents of ``tests/cli/watch_docs/`` again from a real server:
``python -m tests.cli.record_watch_docs``.

Starts ``shipyard serve`` (and its agent) on a temporary data directory, deploys the example app
blue-green, then a canary with analysis and a gate (promoted) under wrk load, a canary that
answers 5xx (rolled back by analysis), a rolling update and a blue-green one, and writes every
distinct (deployment, service) pair it read, with the time it read them (``at``), to
``/tmp/watch_docs/<scenario>.json``. ``test_watch.py``'s fixtures are snapshots picked from
these files. Not a test (it takes a minute and needs wrk).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.e2e.support import Server, Wrk, wait_until

from shipyard.cli.demo import _git, commit_version, make_example_repo, set_replicas

OUT = Path("/tmp/watch_docs")
FAST = {"interval_seconds": 1, "min_requests": 20}
BLUE_GREEN = {
    "BlueGreen": {"switch_delay_seconds": 1, "bake_seconds": 2, "scale_down_delay_seconds": 1}
}


def canary(*stages: dict[str, Any]) -> dict[str, Any]:
    return {"Canary": {"stages": list(stages), "scale_down_delay_seconds": 1}}


def record(server: Server, name: str, dep: str) -> dict[str, Any]:
    """Every distinct state of ``dep`` until it ends, written to ``OUT/name.json``."""
    assert server.client is not None
    seen, snaps = "", []
    while True:
        d = server.deployment(dep)
        r = server.client.get(f"/api/v1/services/{d['service']}")
        s = r.json() if r.status_code == 200 else None
        key = json.dumps(
            [
                d["status"],
                [(x["name"], x["status"], len(x["detail"].get("measurements", [])))
                 for x in d["stages"]],
                s and s["weights"],
                s and [(x["replica_id"], x["ready"], x["state"]) for x in s["replicas"]],
            ]
        )  # fmt: skip
        if key != seen:
            seen = key
            snaps.append({"deployment": d, "service": s, "at": time.time()})
            (OUT / f"{name}.json").write_text(json.dumps(snaps, indent=1))
        if d["status"] in ("Success", "Failed", "RolledBack"):
            return d
        time.sleep(0.1)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="watch-docs-"))
    tmp.chmod(0o755)  # sandboxed apps run under another uid
    server = Server(tmp / "data").start()
    try:
        repo = make_example_repo(tmp / "repo")
        head = _git(repo, "rev-parse", "HEAD")
        url = record(server, "blue_green_first", server.deploy_with(repo, head, BLUE_GREEN))
        load = Wrk(url["result"]["url"], seconds=40, connections=8)
        time.sleep(2)
        gated = canary(
            {"weight": 20, "duration_seconds": 3, "analysis": FAST, "pause": True},
            {"weight": 50, "duration_seconds": 3, "analysis": FAST},
        )
        dep = server.deploy_with(repo, commit_version(repo, "v2"), gated)

        def promote() -> None:
            wait_until(lambda: server.deployment(dep)["status"] == "Paused", 120, "the gate")
            time.sleep(1.5)
            server.promote(dep)

        promoter = threading.Thread(target=promote)
        promoter.start()
        record(server, "canary_promoted", dep)
        promoter.join()
        bad = commit_version(repo, "v-5xx", error_rate=0.3)
        failing = canary({"weight": 30, "duration_seconds": 20, "analysis": FAST})
        record(server, "canary_rolled_back", server.deploy_with(repo, bad, failing))
        load.proc.terminate()
        load.proc.communicate(timeout=30)
        set_replicas(repo, 2)
        rolling = {"Rolling": {"max_surge": 1, "max_unavailable": 0}}
        record(server, "rolling", server.deploy_with(repo, commit_version(repo, "v3"), rolling))
        record(
            server, "blue_green", server.deploy_with(repo, commit_version(repo, "v4"), BLUE_GREEN)
        )
    finally:
        server.stop()
        server.stop_agent()


if __name__ == "__main__":
    main()
