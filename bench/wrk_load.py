"""wrk as the benchmarks' load generator: start it in the background, parse its report.

Shared by bench_deploy.py and bench_progressive.py (bench/run.py puts bench/ on sys.path).
"""

from __future__ import annotations

import re
import shutil
import subprocess


def start(url: str, seconds: int) -> subprocess.Popen[str]:
    """wrk ``-t2 -c32`` through ``url`` for ``seconds``; ``communicate()`` gives its report."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed; run scripts/bootstrap.sh")
    return subprocess.Popen(
        [wrk, "-t2", "-c32", f"-d{seconds}s", "--timeout", "10s", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def parse(out: str) -> tuple[int, int, int, str]:
    """(requests made, non-2xx/3xx responses, socket errors, requests/s) from wrk's report."""
    m = re.search(r"(\d+) requests in", out)
    if not m:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return (
        int(m.group(1)),
        int(non2xx.group(1)) if non2xx else 0,
        sum(int(g) for g in sock.groups()) if sock else 0,
        rps.group(1) if rps else "?",
    )
