"""Starting a region's agent again after ``kill -9``: one agent, however many callers noticed.

After a kill every caller of the agent (the janitor, API reads, a deployment's steps) finds it
gone at the same moment and asks ``attach_or_start_agent`` to start it. CI once ended with two
agents that had both adopted one state file's containers: the one nobody talked to restarted
them as crashed after a ``service delete`` had stopped them. Real detached agents here, started
the way ``shipyard serve`` starts them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.runtime.local import attach_or_start_agent

REGION = "local"


def agents_of(data_dir: Path) -> list[int]:
    """Pids of the ``shipyard agent`` processes running for ``data_dir``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and b"agent" in argv and str(data_dir).encode() in argv:
            pids.append(int(entry.name))
    return sorted(pids)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "data"
    d.mkdir()
    yield d
    for pid in agents_of(d):
        os.kill(pid, signal.SIGKILL)


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid not in agents_of_any(pid):
            return
        time.sleep(0.02)
    raise AssertionError(f"agent {pid} still runs {timeout}s after SIGKILL")


def agents_of_any(pid: int) -> list[int]:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return []
    return [] if state == "Z" else [pid]


def test_callers_that_all_find_the_agent_killed_start_one_agent(data_dir: Path) -> None:
    url, token = asyncio.run(attach_or_start_agent(data_dir, REGION))
    [first] = agents_of(data_dir)
    os.kill(first, signal.SIGKILL)
    wait_gone(first)

    async def everyone_at_once() -> list[tuple[str, str]]:
        return await asyncio.gather(*(attach_or_start_agent(data_dir, REGION) for _ in range(6)))

    answers = asyncio.run(everyone_at_once())
    assert len(set(answers)) == 1, f"callers were given different agents: {answers}"
    [(new_url, new_token)] = set(answers)
    assert new_url != url or new_token != token, "the killed agent's address was given back"
    time.sleep(0.5)  # a second agent, had one been started, would be running by now
    survivors = agents_of(data_dir)
    assert len(survivors) == 1 and survivors[0] != first, survivors
    info = json.loads((data_dir / "agents" / REGION / "agent.json").read_text())
    assert info["pid"] == survivors[0]


def test_a_second_agent_for_the_same_directory_refuses_to_start(data_dir: Path) -> None:
    asyncio.run(attach_or_start_agent(data_dir, REGION))
    [running] = agents_of(data_dir)
    argv = [sys.executable, "-m", "shipyard.cli.main", "agent", "--data-dir", str(data_dir)]
    second = subprocess.run(
        [*argv, "--region", REGION],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0
    assert f"another agent for region {REGION} already runs" in second.stderr, second.stderr
    assert f"(pid {running})" in second.stderr, second.stderr
    assert "shipyard agent stop --region local" in second.stderr, second.stderr
    assert agents_of(data_dir) == [running], "the refused agent must not touch the running one"
    info = json.loads((data_dir / "agents" / REGION / "agent.json").read_text())
    assert info["pid"] == running, "the refused agent must leave agent.json to the running one"
