"""The agent's instance lock: at most one ``shipyard agent`` per agent directory.

Two agents restoring one ``state.json`` would both adopt its containers, and the one the control
plane no longer talks to restarts them as crashed once the other stops them (CI: a deleted
service's containers kept running). ``run_agent`` (agent/server.py) takes the lock before it
touches anything; ``runtime/local.attach_or_start_agent`` only starts agents one at a time, and
this lock turns away any other start.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

#: The lock file in the agent directory: an flock target holding the holder's pid (no secret).
LOCK_FILE = "agent.lock"
_MODE = 0o600


def hold_agent_lock(directory: Path, region: str) -> int:
    """Make this process the region's only agent for ``directory``: an exclusive ``flock`` on
    ``agent.lock``, held until the process ends (``kill -9`` included), or ``SystemExit`` naming
    the agent that holds it. Called first by ``run_agent``."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SystemExit(
            f"another agent for region {region} already runs from {directory} (pid {holder}); "
            f"stop it first (shipyard agent stop --region {region}) or give this one another "
            "--data-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
