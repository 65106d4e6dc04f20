"""How long after Prometheus can see a canary failing does Shipyard abort it?
``python bench/run.py prometheus_abort``.

The stack of tests/e2e/test_observability.py: ``shipyard serve`` (and its agent) with the bundled
``hello`` example, and a Prometheus of its own (tests/prometheus.py) scraping ``/metrics`` every
second with a ``deployment:read`` token. Each run deploys a canary answering 5xx on every request
(``/health`` stays green), driven by the built-in load (40 rps) and judged only by a PromQL error
rate through that Prometheus (``[[analysis.metrics]]``, ``failure_condition = "result >= 0.2"``,
the window = the metric's interval), once per interval in ``INTERVALS``.

Three instants per run, all on this machine's wall clock:

- *visible*: the first instant at which the query, evaluated by Prometheus, crosses the failure
  condition -- found afterwards with ``/api/v1/query_range`` at a 50 ms step over the
  deployment's life (so it is when the scraped samples made the failure visible, not when
  somebody happened to ask);
- *verdict*: the failing measurement's ``at`` in the analysis stage's record;
- *stable*: the rollback stage's end: stable back at 100%, verified on the router
  (``detection_to_rollback_ms`` is verdict -> stable as the record measures it).

visible -> verdict is bounded by the measurement interval (a measurement is taken once per
interval), so the table gives it per interval. ``SHIPYARD_BENCH_PROM_RUNS`` overrides ``RUNS``.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from shipyard.cli.demo import _git, commit_version, make_example_repo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the end-to-end harness, reused
from tests.e2e.observability import (  # noqa: E402
    error_rate_query,
    promql_canary,
    query_range,
    scraping,
)
from tests.e2e.support import Server  # noqa: E402
from tests.prometheus import PrometheusServer  # noqa: E402

RUNS = int(os.environ.get("SHIPYARD_BENCH_PROM_RUNS", "3"))
#: Measurement intervals (= query windows), seconds.
INTERVALS = (2, 4)
SCRAPE = "1s"
STEP_S = 0.05


def _ts(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def _visible(prom: PrometheusServer, revision: str, window: int, start: float, end: float) -> float:
    """The first evaluation instant at which Prometheus had the failure (module docstring)."""
    query = error_rate_query(revision, f"{window}s")
    for series in query_range(prom, query, start, end, STEP_S):
        for at, value in series["values"]:
            if float(value) >= 0.2:
                return float(at)
    raise RuntimeError(f"Prometheus never saw the failure of {revision}")


def _one(
    server: Server, prom: PrometheusServer, repo: Path, interval: int, i: int
) -> tuple[float, ...]:
    commit = commit_version(repo, f"bad-{interval}-{i}", error_rate=1.0)
    doc = server.wait_final(
        server.deploy_with(repo, commit, promql_canary(prom, interval, 6 * interval, extensions=5)),
        300,
    )
    if doc["status"] != "RolledBack" or doc["error"]["type"] != "AnalysisFailed":
        raise RuntimeError(f"bad canary ended {doc['status']}: {doc.get('error')}")
    analysis = next(s for s in doc["stages"] if s["name"].startswith("analysis_"))
    verdict = _ts(analysis["detail"]["measurements"][-1]["at"])
    rollback = next(s for s in doc["stages"] if s["name"] == "rollback")
    stable = _ts(rollback["finished_at"])
    visible = _visible(
        prom, doc["green_revision"], interval, _ts(analysis["started_at"]) - 1, stable
    )
    commit_version(repo, f"fixed-{interval}-{i}")  # the next bad commit is a new one
    return verdict - visible, stable - verdict, stable - visible


def main() -> str:
    root = Path(tempfile.mkdtemp(prefix="shipyard-bench-prom-"))
    server = Server(root / "data")
    results: dict[int, list[tuple[float, ...]]] = {}
    try:
        server.start()
        repo = make_example_repo(root / "repo")
        doc = server.wait_final(server.deploy(repo, _git(repo, "rev-parse", "HEAD")))
        if doc["status"] != "Success":
            raise RuntimeError(f"first deployment: {doc['status']} {doc.get('error')}")
        with scraping(server, SCRAPE) as prom:
            for i in range(RUNS):  # the intervals in turns: both see the same machine
                for interval in INTERVALS:
                    results.setdefault(interval, []).append(_one(server, prom, repo, interval, i))
    finally:
        server.stop()
        server.stop_agent()
        shutil.rmtree(root, ignore_errors=True)

    def cell(values: list[float]) -> str:
        ms = sorted(v * 1000 for v in values)
        return f"{statistics.median(ms):.0f} ({ms[0]:.0f}-{ms[-1]:.0f})"

    rows = [
        f"| {interval} s | {len(runs)} | "
        + " | ".join(cell([r[k] for r in runs]) for k in range(3))
        + " |"
        for interval, runs in results.items()
    ]
    return (
        "## Prometheus-judged canary: from a visible failure to the abort\n\n"
        "`bench/bench_prometheus_abort.py`: `shipyard serve` + agent + the example app, a "
        f"Prometheus of its own scraping `/metrics` every {SCRAPE} (bearer token, "
        "`deployment:read` only). Each run: a canary answering 5xx on every request, 40 rps of "
        "built-in load, judged only by a PromQL error rate (`result >= 0.2` fails) measured once "
        "per interval over a window of the same length. *Visible*: the first instant the query, "
        f"evaluated by Prometheus (`query_range`, {STEP_S * 1000:.0f} ms step), crosses 0.2; "
        "*verdict*: the failing measurement; *stable*: the rollback stage's end (stable at "
        "100%, verified on the router). Milliseconds, median (min-max).\n\n"
        "| interval = window | runs | visible -> verdict | verdict -> stable | "
        "visible -> stable |\n"
        "|---|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        "visible -> verdict is bounded by the interval: the analysis measures once per interval, "
        "so a failure becomes a verdict at the next measurement after Prometheus has it.\n"
    )


if __name__ == "__main__":
    print(main())
