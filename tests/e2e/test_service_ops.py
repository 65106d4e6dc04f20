"""The issue 11 paper cuts as a user meets them: the real ``shipyard`` CLI (a child process, as
typed in a terminal) against ``shipyard serve``, its agent and real app processes, with wrk
through the service's URL while it is scaled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from shipyard.cli.demo import _git
from tests.e2e.support import Server, Wrk, wait_until


def shipyard(server: Server, *args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    """``shipyard ARGS`` with a token minted from the server's data directory."""
    env = {
        **os.environ,
        "COLUMNS": str(columns),
        "SHIPYARD_SERVER": server.base,
        "SHIPYARD_DATA_DIR": str(server.data_dir),
    }
    env.pop("SHIPYARD_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "shipyard.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def said(done: subprocess.CompletedProcess[str]) -> str:
    return " ".join((done.stdout + done.stderr).split())


def ready(server: Server, revision: str) -> int:
    return sum(1 for r in server.service()["replicas"] if r["revision"] == revision and r["ready"])


def test_ids_scale_under_load_delete_and_agent_stop(
    server: Server, repo: Path, tmp_path: Path
) -> None:
    first = server.wait_final(server.deploy(repo, _git(repo, "rev-parse", "HEAD")))
    assert first["status"] == "Success", first.get("error")
    revision, url = first["green_revision"], first["result"]["url"]

    history = shipyard(server, "history", "hello", columns=50)
    assert history.returncode == 0, said(history)
    assert first["id"] in history.stdout  # whole, at 50 columns
    status = shipyard(server, "status", first["id"][:6])
    assert status.returncode == 0, said(status)
    assert first["id"] in status.stdout

    before = server.router_requests()
    load = Wrk(url, seconds=12, connections=8)
    server.wait_for_traffic(before)
    up = shipyard(server, "scale", "hello", "3")
    assert up.returncode == 0, said(up)
    assert f"{revision} runs 3 replica(s), was 1 (started 2)" in said(up)
    assert ready(server, revision) == 3
    down = shipyard(server, "scale", "hello", "1")
    assert down.returncode == 0, said(down)
    assert "drained and stopped 2" in said(down)
    result = load.result()
    assert result.requests > 100, result.output
    assert result.failed == 0, result.output  # new ones only once healthy, old ones drained
    assert ready(server, revision) == 1

    refused = shipyard(server, "service", "delete", "hello")  # no terminal, no --yes
    assert refused.returncode == 2 and "pass --yes" in said(refused)
    assert httpx.get(url).status_code == 200
    deleted = shipyard(server, "service", "delete", "hello", "--yes")
    assert deleted.returncode == 0, said(deleted)
    assert f"route {url} removed" in said(deleted)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)
    assert server.client is not None
    assert server.client.get("/api/v1/services/hello").status_code == 404

    server.stop()  # or its janitor starts the agent again within a second
    info = server.data_dir / "agents" / "local" / "agent.json"
    pid = json.loads(info.read_text())["pid"]
    stopped = shipyard(server, "agent", "stop")
    assert stopped.returncode == 0, said(stopped)
    assert f"stopped the agent of region local (pid {pid})" in said(stopped)
    assert not info.exists()
    wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, "the agent's process to go")
    again = shipyard(server, "agent", "stop")
    assert again.returncode == 0 and "no agent is running for region local" in said(again)
