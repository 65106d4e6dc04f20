"""Replica logs benchmark: what keeping an app's output costs (``agent/replica_logs.py``).

* Writing: an app prints 200,000 lines of 100 bytes on stdout; the time until the last one is
  stored, through the agent's pump thread (two pipes, stamped lines, rotation) with the secret
  masker the agent uses (``logs.SecretMasker`` over a data directory holding a key and a token)
  and without it, beside the anchor: the same app writing straight into a file (what an app's
  output costs when nobody stamps, masks or rotates it). Medians of 5 alternating runs.
* Reading: a replica log at its cap (10 MiB x 3 segments of 100-byte lines): the last 200 and
  the last 10,000 lines, and a follower's poll that finds nothing new (what ``--follow`` costs
  the agent every 0.5 s). Medians of 30 runs.

``python bench/run.py replica_logs``.
"""

from __future__ import annotations

import functools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shipyard.agent import replica_logs
from shipyard.agent.processes import pump_log
from shipyard.agent.replica_logs import LogLimits, ReplicaLog
from shipyard.logs import SecretMasker
from shipyard.runtime.base import LogQuery

LINES = 200_000
PRINTER = (
    f"import sys\nline = 'x' * 99 + '\\n'\nsys.stdout.writelines(line for _ in range({LINES}))\n"
)
WRITE_RUNS = 5
READ_RUNS = 30


def _through_pump(root: Path, mask: Callable[[str], str]) -> float:
    log = ReplicaLog(root, LogLimits(), service="bench", revision="v1", replica_id=root.name)
    (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
    log.attach()
    pump = threading.Thread(target=pump_log, args=({out_r: "stdout", err_r: "stderr"}, log, mask))
    start = time.perf_counter()
    pump.start()
    subprocess.run([sys.executable, "-c", PRINTER], stdout=out_w, stderr=err_w, check=True)
    os.close(out_w)
    os.close(err_w)
    pump.join()
    elapsed = time.perf_counter() - start
    log.retire()
    return elapsed


def _straight_to_file(path: Path) -> float:
    start = time.perf_counter()
    with path.open("wb") as f:
        subprocess.run([sys.executable, "-c", PRINTER], stdout=f, check=True)
    return time.perf_counter() - start


def _median_ms(fn: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples)


def main() -> str:
    with tempfile.TemporaryDirectory(prefix="bench-replica-logs-") as d:
        root = Path(d)
        data = root / "data"
        (data / "keys").mkdir(parents=True)
        (data / "keys" / "signing.key").write_bytes(os.urandom(32).hex().encode())
        masker = SecretMasker.from_data_dir(data, b"agent-token-" + os.urandom(8).hex().encode())
        times: dict[str, list[float]] = {"anchor": [], "pump": [], "pump+mask": []}
        for i in range(WRITE_RUNS):  # alternating, so a noisy neighbour hits all three alike
            times["anchor"].append(_straight_to_file(root / f"plain-{i}.log"))
            times["pump"].append(_through_pump(root / "logs" / f"p-{i}", lambda s: s))
            times["pump+mask"].append(_through_pump(root / "logs" / f"m-{i}", masker))
        rows = []
        anchor = statistics.median(times["anchor"])
        for name, label in (
            ("anchor", "app writes its own file (anchor)"),
            ("pump", "agent pump: two pipes, stamped, rotating"),
            ("pump+mask", "agent pump + secret masking (as the agent runs)"),
        ):
            t = statistics.median(times[name])
            rows.append(
                f"| {label} | {t * 1000:.0f} ms | {LINES / t / 1000:.0f}k lines/s | "
                f"{t / anchor:.2f}x |"
            )

        # A replica log at its cap.
        service = root / "svc"
        log = ReplicaLog(service / "r1", LogLimits(), service="svc", revision="v1",
                         replica_id="r1")  # fmt: skip
        batch = ["y" * 60] * 1000
        while (
            len(replica_logs._segments(service / "r1")) < 3
            or sum(p.stat().st_size for _, p in replica_logs._segments(service / "r1"))
            < 3 * LogLimits().segment_bytes - 200_000
        ):
            log.write("stdout", batch)
        size = sum(p.stat().st_size for _, p in replica_logs._segments(service / "r1"))
        end = replica_logs.read(service, LogQuery(tail=0)).cursor
        reads = [
            ("last 200 lines", LogQuery(tail=200)),
            ("last 10,000 lines", LogQuery(tail=10_000)),
            ("follower's poll, nothing new", LogQuery(after=end)),
        ]
        read_rows = []
        for label, q in reads:
            ms = _median_ms(functools.partial(replica_logs.read, service, q), READ_RUNS)
            read_rows.append(f"| {label} | {ms:.2f} ms |")
    return (
        "## Replica logs\n\n"
        f"Writing {LINES:,} lines of 100 bytes (medians of {WRITE_RUNS} alternating runs; the "
        "anchor is the same app writing straight into a file):\n\n"
        "| path | time | rate | vs anchor |\n|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"Reading a replica log at its cap ({size / 2**20:.1f} MiB in 3 segments; medians of "
        f"{READ_RUNS}):\n\n| read | time |\n|---|---|\n" + "\n".join(read_rows) + "\n"
    )
