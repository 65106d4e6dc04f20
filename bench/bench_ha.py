"""The HA control plane (issue 14): takeover time, deploy API latency with one and two replicas,
and audit appends per second with concurrent writers.

- Takeover: ``tests/e2e/ha.py``'s stack (a PostgreSQL cluster of its own, two ``shipyard serve``
  replicas, one joined agent). ``TAKEOVER_RUNS`` times: a blue-green deployment of the bundled
  ``hello`` example submitted to one replica (each in turn) waits at its switch delay; that
  replica is killed with ``kill -9``; the time until the other replica's API names itself the
  deployment's ``driver`` is the takeover time. The killed replica is started again and the
  deployment aborted (through the heir) before the next run. A takeover waits for the lease to
  expire (``Settings.lease_seconds``, 10 s), so the figure is the lease less how long before the
  kill the lease was last renewed, plus the takeover loop's tick.
- Deploy API latency: ``POST /api/v1/deploy`` as a client sees it (202 answered), on a stack with
  one replica and on one with two (requests alternating between the replicas), the two stacks
  up side by side and measured in turns; each deployment is left to finish before the next.
- Audit appends per second: ``SqlAuditLog`` in ``WRITERS`` processes at once (each with its own
  anchor, as replicas have), ``APPENDS`` records each, on SQLite (one database file, as one data
  directory's processes share it) and on PostgreSQL; the chain is verified afterwards with
  ``shipyard audit verify``. ``python bench/bench_ha.py --audit-writer ...`` is one writer.

``SHIPYARD_BENCH_HA_RUNS`` overrides ``TAKEOVER_RUNS``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from shipyard.cli.demo import _git, commit_version, make_example_repo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the end-to-end HA harness, reused
from tests.e2e.ha import HAStack, Replica  # noqa: E402
from tests.e2e.support import wait_for_state  # noqa: E402
from tests.postgres import own_postgres  # noqa: E402

TAKEOVER_RUNS = int(os.environ.get("SHIPYARD_BENCH_HA_RUNS", "5"))
LATENCY_DEPLOYS = 10
WRITERS = (1, 4)
APPENDS = 100
LEASE_S = 10.0


def _blue_green(**params: float) -> dict[str, Any]:
    return {
        "BlueGreen": {
            "switch_delay_seconds": 0,
            "bake_seconds": 0,
            "scale_down_delay_seconds": 0,
            **params,
        }
    }


def _first(stack: HAStack, repo: Path, service: str) -> None:
    replica = stack.replicas[stack.names[0]]
    doc = stack.wait_final(
        stack.deploy(replica, repo, _git(repo, "rev-parse", "HEAD"), service, _blue_green())
    )
    if doc["status"] != "Success":
        raise RuntimeError(f"first deployment of {service}: {doc['status']} {doc.get('error')}")


def _takeovers(stack: HAStack, repo: Path) -> list[float]:
    """Seconds from ``kill -9`` of the driver to the heir driving, per run (module docstring)."""
    return [_takeover(stack, repo, i) for i in range(TAKEOVER_RUNS)]


def _takeover(stack: HAStack, repo: Path, i: int) -> float:
    driver = stack.replicas[stack.names[i % len(stack.names)]]
    heir = stack.other(driver)
    commit = commit_version(repo, f"takeover-{i}")
    dep = stack.deploy(driver, repo, commit, "hello", _blue_green(switch_delay_seconds=300))
    wait_for_state(
        lambda: stack.deployment(dep, driver)["status"],
        lambda s: s == "AwaitingSwitch",
        120,
        f"{dep} to wait at its switch delay",
    )
    killed = stack.kill9(driver)
    wait_for_state(
        lambda: stack.driver(dep, heir),
        lambda d: d == heir.name,
        LEASE_S * 6,
        f"{heir.name} to take {dep} over",
    )
    took = time.monotonic() - killed
    stack.restart(driver)
    r = stack.client(heir).post(f"/api/v1/deployments/{dep}/abort")
    if r.status_code != 202:
        raise RuntimeError(f"abort of {dep}: {r.status_code} {r.text}")
    doc = stack.wait_final(dep)
    if doc["status"] != "RolledBack":
        raise RuntimeError(f"{dep} after abort: {doc['status']} {doc.get('error')}")
    return took


def _deploy_latency(stack: HAStack, repo: Path, i: int) -> float:
    """Milliseconds of one ``POST /api/v1/deploy`` (replicas in turn); waits for the end."""
    replica: Replica = stack.replicas[stack.names[i % len(stack.names)]]
    commit = commit_version(repo, f"latency-{i}")
    started = time.perf_counter()
    r = stack.submit(replica, repo, commit, "lat", _blue_green())
    ms = (time.perf_counter() - started) * 1000
    if r.status_code != 202:
        raise RuntimeError(f"deploy to {replica.name}: {r.status_code} {r.text}")
    doc = stack.wait_final(str(r.json()["deployment_id"]))
    if doc["status"] != "Success":
        raise RuntimeError(f"latency deployment {i}: {doc['status']} {doc.get('error')}")
    return ms


def _control_plane() -> tuple[list[float], dict[int, list[float]]]:
    root = Path(tempfile.mkdtemp(prefix="shipyard-bench-ha-"))
    stacks = {1: HAStack(root / "one", replicas=1), 2: HAStack(root / "two", replicas=2)}
    try:
        for stack in stacks.values():
            stack.start()
        repos = {n: make_example_repo(root / f"repo-{n}") for n in stacks}
        for n, stack in stacks.items():
            _first(stack, repos[n], "hello")
            _first(stack, repos[n], "lat")
        latency: dict[int, list[float]] = {n: [] for n in stacks}
        for i in range(LATENCY_DEPLOYS):  # in turns, so both see the same machine
            for n, stack in stacks.items():
                latency[n].append(_deploy_latency(stack, repos[n], i))
        stacks[1].stop()
        took = _takeovers(stacks[2], repos[2])
        return took, latency
    finally:
        for stack in stacks.values():
            try:
                stack.stop()
            except Exception as exc:  # the numbers still count
                print(f"stopping a bench stack: {exc!r}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)


# --- audit appends -----------------------------------------------------------------------------


def _writer(database: str, data_dir: Path, anchor_dir: Path, count: int) -> None:
    """One writer process: open the store, say ``ready``, wait for a line on stdin, append
    ``count`` records, print the seconds it took."""
    from shipyard.audit.chain import AuditEvent
    from shipyard.audit.log import SqlAuditLog
    from shipyard.store.engine import open_engine

    engine = open_engine(database or None, data_dir)
    log = SqlAuditLog(engine, anchor_dir / "audit.head")
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()

    async def append_all() -> None:
        for i in range(count):
            await log.append(
                AuditEvent(event_type="bench.append", service="bench", detail={"i": i})
            )

    asyncio.run(append_all())
    print(f"{time.perf_counter() - started:.6f}", flush=True)
    engine.dispose()


def _appends(database: str, data_dir: Path, writers: int) -> float:
    """Appends per second of ``writers`` processes at once (``APPENDS`` each)."""
    procs = []
    for w in range(writers):
        # the first writer's anchor is the data directory's (``audit verify`` checks it), the
        # others' are their own, as each replica has its own
        anchor_dir = data_dir / f"writer-{w}" if w else data_dir
        anchor_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, __file__, "--audit-writer", database, str(data_dir)]
        argv += [str(anchor_dir), str(APPENDS)]
        procs.append(
            subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )
    for p in procs:
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"an audit writer did not start (exit {p.wait()})")
    started = time.perf_counter()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"an audit writer failed (exit {p.returncode})")
    return writers * APPENDS / (time.perf_counter() - started)


def _verify(database: str, data_dir: Path) -> None:
    args = ["--data-dir", str(data_dir)] + (["--database", database] if database else [])
    done = subprocess.run(
        [sys.executable, "-m", "shipyard.cli.main", "audit", "verify", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"audit verify after the appends: {done.stdout}{done.stderr}")


def _audit_rates() -> dict[tuple[str, int], float]:
    root = Path(tempfile.mkdtemp(prefix="shipyard-bench-audit-"))
    rates: dict[tuple[str, int], float] = {}
    try:
        with own_postgres() as pg:
            for writers in WRITERS:  # in turns, so both see the same machine
                for backend in ("SQLite", "PostgreSQL"):
                    data_dir = root / f"{backend}-{writers}"
                    data_dir.mkdir(parents=True)
                    database = (
                        pg.create_database("bench").replace(
                            "postgresql+psycopg://", "postgresql://", 1
                        )
                        if backend == "PostgreSQL"
                        else ""
                    )
                    rates[(backend, writers)] = _appends(database, data_dir, writers)
                    _verify(database, data_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rates


def main() -> str:
    took, latency = _control_plane()
    rates = _audit_rates()

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} | {max(values):.1f}"

    rate_rows = "\n".join(
        f"| {writers} | {rates[('SQLite', writers)]:.0f} | {rates[('PostgreSQL', writers)]:.0f} |"
        for writers in WRITERS
    )
    return (
        "## HA control plane: takeover, deploy latency, audit appends\n\n"
        "`bench/bench_ha.py`: a PostgreSQL cluster of its own, `shipyard serve` replicas on it "
        "(`--database`, `--shared-dir`, `--replica-id`, `--no-local-agent`) and one agent "
        "joined with every replica's fleet URL (`tests/e2e/ha.py`).\n\n"
        f"Takeover after `kill -9` of the driving replica ({len(took)} runs; a blue-green "
        "waiting at its switch delay, the replicas killed in turn; time from the kill to the "
        f"other replica's API naming itself the driver; lease {LEASE_S:.0f} s): median "
        f"**{statistics.median(took):.2f} s**, max **{max(took):.2f} s**. A takeover waits "
        "for the lease to run out, so this is the lease less the time since its last renewal "
        "(renewed every quarter lease), plus the takeover loop's second at most.\n\n"
        f"Deploy API latency (`POST /api/v1/deploy` to 202, {LATENCY_DEPLOYS} deployments "
        "per stack, each finished before the next; the two stacks up side by side and "
        "measured in turns), ms:\n\n"
        "| replicas | median | max |\n|---|---:|---:|\n"
        f"| 1 | {ms(latency[1])} |\n| 2 (requests alternating) | {ms(latency[2])} |\n\n"
        f"Audit appends per second (`SqlAuditLog`, {APPENDS} records per writer process, "
        "writers started together; the chain verified after each run):\n\n"
        "| writers | SQLite | PostgreSQL |\n|---|---:|---:|\n" + rate_rows + "\n"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--audit-writer"]:
        _, _, db, data, anchors, n = sys.argv
        _writer(db, Path(data), Path(anchors), int(n))
    else:
        print(main())
