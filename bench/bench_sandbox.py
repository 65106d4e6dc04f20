"""Sandbox benchmark: what confining a workload costs at start, the only time it costs anything
(afterwards the process runs at native speed; there is no syscall filter or proxy).

Each row starts ``python -c pass`` (the interpreter most apps and builds start) 40 times and
reports the median and the slowest, side by side:

* unsandboxed: the command as ``--insecure-no-sandbox`` runs it;
* bubblewrap alone: the same read-only view, PID/IPC/UTS namespaces and private /tmp, started
  directly by root (the anchor: what the tool costs by itself);
* Shipyard's sandbox: ``launch.py`` (mount namespace, data directory hidden, uid switch) then
  bubblewrap as the service's uid, as every build command and replica starts.

``python bench/run.py sandbox``; needs root and bubblewrap.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shipyard.sandbox import Sandbox, SandboxPolicy
from shipyard.sandbox.launch import bwrap_args

RUNS = 40


def _time(cmd: list[str], cwd: Path) -> list[float]:
    samples = []
    env = {"PATH": os.environ.get("PATH", os.defpath)}
    for _ in range(RUNS):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=env, check=True)
        samples.append((time.perf_counter() - t) * 1000)
    return samples


def main() -> str:
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        return "## Sandbox\n\nSkipped: needs root and bubblewrap (apt-get install bubblewrap).\n"
    argv = [sys.executable, "-c", "pass"]
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as d:
        data = Path(d) / "data"
        work = data / "builds" / "b-1" / "src"
        work.mkdir(parents=True)
        data.chmod(0o700)
        sandbox = Sandbox(SandboxPolicy(data))
        sandbox.check()
        sandbox.hand_over("bench", work)
        bwrap = shutil.which("bwrap") or "bwrap"
        rows = [
            ("unsandboxed (`--insecure-no-sandbox`)", argv),
            (
                "bubblewrap alone (anchor)",
                bwrap_args(bwrap, writable=[str(work)], chdir=str(work), argv=argv),
            ),
            (
                "Shipyard's sandbox (launch.py + uid + bubblewrap)",
                sandbox.command(argv, service="bench", cwd=work, writable=[work]),
            ),
        ]
        lines = [
            "## Sandbox: cost of starting a workload confined",
            "",
            f"`python -c pass`, {RUNS} starts each (`python bench/run.py sandbox`).",
            "",
            "| how | median | max |",
            "|---|---|---|",
        ]
        for name, cmd in rows:
            ms = _time(cmd, work)
            lines.append(f"| {name} | {statistics.median(ms):.1f} ms | {max(ms):.1f} ms |")
    lines += [
        "",
        "A replica or build command pays this once per process start; a restart after a crash",
        "pays it again. Nothing is paid while it runs.",
    ]
    return "\n".join(lines) + "\n"
