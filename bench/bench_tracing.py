"""What tracing costs a deployment: no exporter vs OTLP/HTTP to a receiver on this machine, in
the same run. ``python bench/run.py tracing``.

Two measurements, each alternating its two contenders deployment by deployment (and swapping
which goes first every round), so both see the same machine:

- *Orchestrator on fakes* (tests/orchestrator/world.py: the real ``Pipeline`` and SQLite store
  over the fake runtime, router with synthetic traffic, prober and builder, and a fake clock, so
  one-minute canary stages take no wall time): a two-stage canary (10% and 50%, 60 s each,
  a measurement every 10 s). One world, its tracer swapped between deployments. The wall time
  of a deployment is then the pipeline's own work -- every span, attribute and export is a
  visible share of it. The tracer comes from
  ``tracing.configure`` as ``shipyard serve`` makes it: the no-op tracer without ``OTEL_*``,
  else the SDK with a ``BatchSpanProcessor`` and the OTLP/HTTP exporter.
- *``shipyard serve`` on the local runtime* (the bundled ``hello`` example: build, start,
  health-gated blue-green switch, bake 0): one server without ``OTEL_*`` and one with
  ``OTEL_EXPORTER_OTLP_ENDPOINT``, side by side; the figure is the deployment's own duration
  from its record (``created_at`` to ``finished_at``).

The receiver (tests/otlp.py, in a process of its own so the CPU measured is Shipyard's) decodes
every export request, so the spans counted are the ones that arrived.
``SHIPYARD_BENCH_TRACING_ROUNDS`` overrides ``ROUNDS``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from shipyard import tracing
from shipyard.cli.demo import _git, commit_version, make_example_repo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test harnesses, reused
from tests import otlp  # noqa: E402
from tests.e2e.support import Server  # noqa: E402
from tests.orchestrator.world import PipelineWorld  # noqa: E402

ROUNDS = int(os.environ.get("SHIPYARD_BENCH_TRACING_ROUNDS", "10"))
SERVE_ROUNDS = max(3, ROUNDS // 2)
CANARY = {
    "Canary": {
        "stages": [
            {"weight": 10, "duration_seconds": 60},
            {"weight": 50, "duration_seconds": 60},
        ],
        "scale_down_delay_seconds": 30,
    }
}
BLUE_GREEN = {
    "BlueGreen": {"switch_delay_seconds": 0, "bake_seconds": 0, "scale_down_delay_seconds": 0}
}


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}"


# --- the orchestrator on fakes -------------------------------------------------------------------


async def _orchestrator(
    endpoint: str,
) -> tuple[dict[str, list[float]], dict[str, list[float]], int]:
    """Wall and CPU milliseconds per canary deployment for each contender, and how many
    deployments were traced.

    One world, its tracer swapped between deployments: the same store, clock and fakes for both
    contenders (two worlds in one event loop would each wait for the other's clock to settle)."""
    traced = tracing.configure({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    untraced = tracing.configure({})
    assert traced.exporters == ("otlp",) and untraced.exporters == ()
    tracers = {"no exporter": untraced.tracer, "OTLP exporter": traced.tracer}
    times: dict[str, list[float]] = {name: [] for name in tracers}
    cpu: dict[str, list[float]] = {name: [] for name in tracers}
    root = Path(tempfile.mkdtemp(prefix="shipyard-bench-tracing-"))
    world = PipelineWorld(root, replicas=1, rps=100.0)
    await world.pipeline.start()
    try:
        first = await world.deploy("0000aaaa", CANARY)
        if first["status"] != "Success":
            raise RuntimeError(f"first deployment: {first['status']} {first.get('error')}")
        for i in range(ROUNDS):
            order = list(tracers) if i % 2 == 0 else list(reversed(tracers))
            for j, name in enumerate(order):
                world.pipeline.deps.tracer = tracers[name]
                t0, c0 = time.perf_counter(), time.process_time()
                doc = await world.deploy(f"{2 * i + j + 1:04x}beef", CANARY)
                times[name].append((time.perf_counter() - t0) * 1000)
                # the process's CPU, every thread's: the batch processor's exports included
                cpu[name].append((time.process_time() - c0) * 1000)
                if doc["status"] != "Success":
                    raise RuntimeError(f"{name}: {doc['status']} {doc.get('error')}")
    finally:
        await world.pipeline.stop()
        traced.shutdown()  # exports what is still batched
        shutil.rmtree(root, ignore_errors=True)
    return times, cpu, ROUNDS


# --- one span ---------------------------------------------------------------------------------

#: A stage span's attributes, as spans.py sets them (deployment, stage, detail).
ATTRIBUTES: dict[str, str | int | bool] = {
    "shipyard.deployment.id": "0b9f0c4e-2d1c-4a55-9d1e-5f9f0a4d3c21",
    "shipyard.deployment.kind": "deployment",
    "shipyard.service": "hello",
    "shipyard.region": "local",
    "shipyard.stage": "analysis_1",
    "shipyard.step.index": 4,
    "shipyard.stage.status": "succeeded",
    "shipyard.stage.verdict": "pass",
    "shipyard.analysis.requests": 1000,
    "shipyard.revision": "1a2b3c4-0b9f0c4e",
}
SPAN_BATCH = 500


def _span_costs(endpoint: str) -> dict[str, float]:
    """CPU microseconds per span (made, 10 attributes, ended; exported for the SDK tracer: the
    batch is flushed inside the measurement), median of ``ROUNDS`` batches per contender."""
    exporter = tracing.configure({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    made = exporter._provider  # the bench flushes what serve would batch
    assert made is not None
    parent = tracing.parent_context("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1)
    tracers = {"no exporter": tracing.NOOP, "OTLP exporter": exporter.tracer}
    costs: dict[str, list[float]] = {name: [] for name in tracers}
    try:
        for i in range(ROUNDS):
            for name in list(tracers) if i % 2 == 0 else list(reversed(tracers)):
                c0 = time.process_time()
                for _ in range(SPAN_BATCH):
                    span = tracers[name].start_span("stage", context=parent, attributes=ATTRIBUTES)
                    span.end()
                made.force_flush()
                costs[name].append((time.process_time() - c0) * 1e6 / SPAN_BATCH)
    finally:
        exporter.shutdown()
    return {name: statistics.median(values) for name, values in costs.items()}


# --- shipyard serve on the local runtime ---------------------------------------------------------


def _duration_ms(doc: dict[str, Any]) -> float:
    start = dt.datetime.fromisoformat(doc["created_at"])
    end = dt.datetime.fromisoformat(doc["finished_at"])
    return (end - start).total_seconds() * 1000


def _serve(endpoint: str) -> dict[str, list[float]]:
    root = Path(tempfile.mkdtemp(prefix="shipyard-bench-tracing-serve-"))
    servers = {
        "no exporter": Server(root / "plain"),
        "OTLP exporter": Server(
            root / "traced",
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "1000"},
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for server in servers.values():
            server.start()
        repo = make_example_repo(root / "repo")
        head = _git(repo, "rev-parse", "HEAD")
        for name, server in servers.items():
            doc = server.wait_final(server.deploy_with(repo, head, BLUE_GREEN), 180)
            if doc["status"] != "Success":
                raise RuntimeError(f"{name} first: {doc['status']} {doc.get('error')}")
        for i in range(SERVE_ROUNDS):
            commit = commit_version(repo, f"v{i + 2}")
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for name in order:
                server = servers[name]
                doc = server.wait_final(server.deploy_with(repo, commit, BLUE_GREEN), 180)
                if doc["status"] != "Success":
                    raise RuntimeError(f"{name}: {doc['status']} {doc.get('error')}")
                times[name].append(_duration_ms(doc))
    finally:
        for server in servers.values():
            server.stop()
            server.stop_agent()
        shutil.rmtree(root, ignore_errors=True)
    return times


def _within(plain: list[float], traced: list[float]) -> str:
    """Whether the difference of the medians is within the spread of the runs, in words."""
    diff = statistics.median(traced) - statistics.median(plain)
    spread = max(max(plain) - min(plain), max(traced) - min(traced))
    where = "within" if abs(diff) <= spread else "larger than"
    return f"{diff:+.0f} ms, {where} the run-to-run spread ({spread:.0f} ms)"


def _receive(conn: Connection) -> None:
    """The receiver's process: sends its endpoint, then (spans, traces) received so far for
    every line asked, until told to stop (None)."""
    with otlp.otlp_receiver() as rx:
        conn.send(rx.endpoint)
        while conn.recv() is not None:
            spans = rx.spans()
            conn.send((len(spans), len({s.trace_id for s in spans})))


def _paired(plain: list[float], traced: list[float]) -> float:
    """The median of the per-round differences (traced minus untraced, run side by side)."""
    return statistics.median(t - p for p, t in zip(plain, traced, strict=True))


def main() -> str:
    # The receiver decodes in a process of its own, so the CPU measured here is Shipyard's.
    ours, theirs = multiprocessing.Pipe()
    receiver = multiprocessing.get_context("fork").Process(target=_receive, args=(theirs,))
    receiver.start()

    def received() -> tuple[int, int]:
        ours.send("count")
        spans, traces = ours.recv()
        return int(spans), int(traces)

    try:
        endpoint = str(ours.recv())
        fakes, fakes_cpu, traced_deployments = asyncio.run(_orchestrator(endpoint))
        spans_fakes, traces_fakes = received()
        serve = _serve(endpoint)
        spans_serve = received()[0] - spans_fakes
        span_cost = _span_costs(endpoint)
    finally:
        ours.send(None)
        receiver.join(30)
    plain, traced = fakes["no exporter"], fakes["OTLP exporter"]
    overhead = statistics.median(traced) - statistics.median(plain)
    c_plain, c_traced = fakes_cpu["no exporter"], fakes_cpu["OTLP exporter"]
    c_overhead = statistics.median(c_traced) - statistics.median(c_plain)
    per_deployment = spans_fakes / traced_deployments
    span_us = span_cost["OTLP exporter"] - span_cost["no exporter"]
    s_plain, s_traced = serve["no exporter"], serve["OTLP exporter"]
    return (
        "## Tracing: the cost of exporting a deployment's trace\n\n"
        "`bench/bench_tracing.py`: the same deployments with no exporter (Shipyard's default: "
        "the no-op tracer) and with OTLP/HTTP to a receiver on this machine (tests/otlp.py, "
        "decoding every request), alternating deployment by deployment in one run. "
        "Milliseconds per deployment, median (min-max).\n\n"
        "| where | deployment | runs each | no exporter | OTLP exporter | difference | "
        "spans received per deployment |\n"
        "|---|---|---:|---:|---:|---:|---:|\n"
        f"| orchestrator on fakes, wall time | canary 10% -> 50%, "
        f"a measurement every 10 s | {len(plain)} | {_ms(plain)} ({min(plain):.1f}-"
        f"{max(plain):.1f}) | {_ms(traced)} ({min(traced):.1f}-{max(traced):.1f}) | "
        f"{overhead:+.1f} ({overhead / statistics.median(plain) * 100:+.1f}%) | "
        f"{spans_fakes / traced_deployments:.0f} ({traces_fakes} traces) |\n"
        f"| orchestrator on fakes, CPU time (all threads) | the same deployments | "
        f"{len(c_plain)} | {_ms(c_plain)} ({min(c_plain):.1f}-{max(c_plain):.1f}) | "
        f"{_ms(c_traced)} ({min(c_traced):.1f}-{max(c_traced):.1f}) | "
        f"{c_overhead:+.1f} ({c_overhead / statistics.median(c_plain) * 100:+.1f}%) | |\n"
        f"| `shipyard serve`, local runtime | blue-green of `hello`, bake 0 | {len(s_plain)} | "
        f"{_ms(s_plain)} ({min(s_plain):.0f}-{max(s_plain):.0f}) | {_ms(s_traced)} "
        f"({min(s_traced):.0f}-{max(s_traced):.0f}) | "
        f"{statistics.median(s_traced) - statistics.median(s_plain):+.0f} | "
        f"{spans_serve / (len(s_traced) + 1):.0f} |\n"
        f"| one span (10 attributes), CPU microseconds | batches of {SPAN_BATCH}, flushed "
        f"| {ROUNDS} | {span_cost['no exporter']:.1f} | {span_cost['OTLP exporter']:.1f} | "
        f"{span_us:+.1f} | |\n\n"
        "The deployments on fakes (a fake clock: a deployment's time is the pipeline's own work) "
        "vary by seconds from one to the next (min-max above), so their difference is not "
        "resolved there (paired: each traced deployment minus the untraced one next to it, "
        f"median {_paired(c_plain, c_traced):+.0f} ms of CPU). Measured on its own, a span costs "
        f"{span_us:.0f} us more with the OTLP exporter than with none (made, batched, encoded "
        f"and sent), so a deployment's {per_deployment:.0f} spans cost about "
        f"{span_us * per_deployment / 1000:.1f} ms. "
        f"On the real runtime the difference of the medians is {_within(s_plain, s_traced)}.\n"
    )


if __name__ == "__main__":
    print(main())
