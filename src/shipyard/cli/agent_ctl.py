"""``shipyard agent stop [--region R]``: stop a region's running agent gracefully.

Mounted by cli/main.py under ``shipyard agent``. The agent writes its pid in
``<data>/agents/<region>/agent.json`` once its API listens (agent/server.py ``run_agent``); this
command checks that the pid is that agent (its API, asked with the agent's token, reports the
same pid; or, if the API does not answer, the process's command line is a Shipyard agent's),
sends SIGTERM, and waits until it is gone. On SIGTERM the agent stops its replicas (each
drained and stopped as the supervisor does) and closes every route, then removes agent.json.

A pid in a stale agent.json may belong to another process by now: such a process is never
signalled. While ``shipyard serve`` runs for the same data directory, its janitor starts the
agent again at its next heartbeat (about a second): the output says so.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer

from shipyard.cli.safe import console, shown

err = console(stderr=True)

#: How often the command looks whether the agent has exited.
_POLL_SECONDS = 0.1


def running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has: only its exit status is
    left for its parent to collect)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: believe kill(0)
    return stat.rpartition(")")[2].split()[0] != "Z"


def is_agent(pid: int, agent_dir: Path, api_url: str) -> bool:
    """Whether ``pid`` is the agent ``agent_dir`` describes (see the module docstring)."""
    try:
        token = (agent_dir / "agent.token").read_text().strip()
        answer = httpx.get(
            f"{api_url}/v1/health", headers={"authorization": f"Bearer {token}"}, timeout=5.0
        )
        if answer.status_code == 200:
            return bool(answer.json().get("pid") == pid)
    except (OSError, ValueError, httpx.HTTPError):
        pass
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"shipyard" in a for a in argv) and b"agent" in argv


def stop(
    data_dir: Annotated[
        Path,
        typer.Option("--data-dir", help="Server data directory.", envvar="SHIPYARD_DATA_DIR"),
    ] = Path(".shipyard"),
    region: Annotated[str, typer.Option(help="The region whose agent to stop.")] = "local",
    timeout: Annotated[
        float, typer.Option(min=1.0, help="Seconds to wait for it to stop its replicas and exit.")
    ] = 60.0,
) -> None:
    """Stop the region's running agent: its replicas stop (drained) and its routes close."""
    agent_dir = data_dir / "agents" / region
    info_path = agent_dir / "agent.json"
    try:
        info = json.loads(info_path.read_text())
        pid = int(info["pid"])
        api_url = str(info["api_url"])
    except FileNotFoundError:
        err.print(
            f"no agent is running for region {shown(region)} in {shown(data_dir)} "
            f"(no {shown(info_path)}); nothing to stop"
        )
        return
    except (OSError, ValueError, KeyError, TypeError) as exc:
        err.print(f"[red]error:[/red] cannot read {shown(info_path)}: {shown(exc)}")
        raise typer.Exit(2) from exc
    if not running(pid):
        err.print(
            f"no agent is running for region {shown(region)} (pid {pid} in {shown(info_path)} "
            "has exited); nothing to stop"
        )
        return
    if not is_agent(pid, agent_dir, api_url):
        err.print(
            f"[red]error:[/red] pid {pid} in {shown(info_path)} is not this region's agent "
            "(the file is stale and the pid now belongs to another process); not signalled"
        )
        raise typer.Exit(2)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() > deadline:
            err.print(
                f"[red]error:[/red] the agent (pid {pid}) is still stopping its replicas after "
                f"{timeout:g} s; wait longer (--timeout) or force it with `kill -KILL {pid}`"
            )
            raise typer.Exit(1)
        time.sleep(_POLL_SECONDS)
    err.print(
        f"stopped the agent of region {shown(region)} (pid {pid}): its replicas stopped and its "
        "routes closed. A `shipyard serve` running on this data directory starts it again "
        "within a second; stop serve first to keep it stopped."
    )
