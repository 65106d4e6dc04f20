"""Issue 15's check, end to end: what an operator sees of a deployment in their own telemetry.

- Traces: ``shipyard serve`` started with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at a real
  OTLP/HTTP receiver in the test (tests/otlp.py). Every deployment is exactly one trace -- a root
  span ``deployment hello`` and a child span per stage, measurement and rollback --, and that
  trace's id is the one ``GET /api/v1/deployments/{id}`` shows (``trace_id``) and every audit
  record of the deployment carries (``detail.trace_id``). A ``traceparent`` on the deploy request
  makes the deployment a child of the caller's span.
- Prometheus: a real Prometheus (tests/prometheus.py) scrapes ``shipyard serve``'s ``/metrics``
  with a token that holds only what ``/metrics`` needs. A canary whose analysis is a PromQL
  error rate over the ``shipyard_router_*`` series -- no built-in router check -- is rolled back
  (``AnalysisFailed``) when the candidate answers 5xx and promoted when it does not. Traffic is
  the built-in ``[analysis] load`` (as in tests/e2e/test_canary_load.py): nobody else visits.
  The measurement that decided is the same in the record, the audit trail and the trace.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from shipyard.cli.demo import _git, commit_version
from shipyard.cli.token import issue_local
from shipyard.domain.manifest import parse_manifest
from tests import otlp
from tests.e2e.observability import (
    ERROR_RATE,
    LOAD,
    METRICS_PERMISSIONS,
    error_rate_query,
    promql_canary,
    scraping,
)
from tests.e2e.support import Server
from tests.prometheus import PrometheusServer

#: A span's status code, as OTLP carries it.
ERROR = Status.STATUS_CODE_ERROR
HEX32 = re.compile(r"[0-9a-f]{32}")
FINAL = ("Success", "Failed", "RolledBack")


def first(server: Server, repo: Path) -> str:
    """The first (blue-green) release of ``hello``; returns its deployment id."""
    dep = server.deploy(repo, _git(repo, "rev-parse", "HEAD"))
    doc = server.wait_final(dep)
    assert doc["status"] == "Success", doc.get("error")
    return dep


def router_canary(weight: int = 20, seconds: int = 4) -> dict[str, Any]:
    """A one-stage canary judged by the built-in router check under the built-in load."""
    analysis = {"interval_seconds": 2, "min_requests": 10, "load": LOAD}
    stage = {"weight": weight, "duration_seconds": seconds, "analysis": analysis}
    return {"Canary": {"stages": [stage], "scale_down_delay_seconds": 1}}


def audit(server: Server, dep: str) -> list[dict[str, Any]]:
    assert server.client is not None
    r = server.client.get(f"/api/v1/deployments/{dep}/audit")
    assert r.status_code == 200, r.text
    records: list[dict[str, Any]] = r.json()["records"]
    return records


# --- traces ------------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[otlp.OtlpReceiver]:
    with otlp.otlp_receiver() as rx:
        yield rx


@pytest.fixture
def traced(tmp_path: Path, receiver: otlp.OtlpReceiver) -> Iterator[Server]:
    """``shipyard serve`` exporting its traces to ``receiver`` (standard variables only; the
    batch delay shortened so a test does not wait the SDK's default 5 s for each batch)."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "shipyard-e2e",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    s = Server(tmp_path / "data", env=env).start()
    try:
        yield s
    finally:
        s.stop()
        s.stop_agent()


def trace_of(receiver: otlp.OtlpReceiver, trace_id: str) -> list[otlp.ReceivedSpan]:
    """The spans of ``trace_id`` once its root (emitted last, when the deployment ended) came."""
    received = receiver.wait_for(
        lambda spans: any(s.trace_id == trace_id and s.name == "deployment hello" for s in spans),
        30,
    )
    return [s for s in received if s.trace_id == trace_id]


def check_tree(
    spans: list[otlp.ReceivedSpan], doc: dict[str, Any], parent: str
) -> otlp.ReceivedSpan:
    """The trace is one tree under one root -- the deployment -- whose parent is ``parent``
    (the caller's span, or "": none); every stage of the record is a span in it. Returns
    the root."""
    roots = [s for s in spans if s.name == "deployment hello"]
    assert len(roots) == 1, [s.name for s in spans]
    root = roots[0]
    assert root.parent_span_id == parent
    assert root.attributes["shipyard.deployment.id"] == doc["id"]
    assert root.resource["service.name"] == "shipyard-e2e"
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == len(spans), "a span id was used twice"
    for span in spans:
        if span is root:
            continue
        # up the tree to the root: no orphan, no span of another trace in between
        hops, at = 0, span
        while at is not root:
            assert at.parent_span_id in by_id, f"{at.name}'s parent is not in the trace"
            at, hops = by_id[at.parent_span_id], hops + 1
            assert hops < len(spans)
        assert span.attributes["shipyard.deployment.id"] == doc["id"], span.name
    names = [s.name for s in spans]
    for stage in doc["stages"]:
        assert stage["name"] in names, f"no span for stage {stage['name']}: {names}"
    return root


def test_every_deployment_is_one_trace_exported_over_otlp(
    traced: Server, receiver: otlp.OtlpReceiver, repo: Path
) -> None:
    server = traced
    deps = [first(server, repo)]
    good = server.deploy_with(repo, commit_version(repo, "v2"), router_canary())
    deps.append(good)
    server.wait_final(good)
    bad = server.deploy_with(repo, commit_version(repo, "v-5xx", error_rate=1.0), router_canary())
    deps.append(bad)
    docs = {dep: server.wait_final(dep) for dep in deps}
    assert [docs[d]["status"] for d in deps] == ["Success", "Success", "RolledBack"]

    trace_ids = {dep: str(doc["trace_id"]) for dep, doc in docs.items()}
    assert all(HEX32.fullmatch(t) for t in trace_ids.values()), trace_ids
    assert len(set(trace_ids.values())) == len(deps), "two deployments share a trace"
    traces = {dep: trace_of(receiver, trace_ids[dep]) for dep in deps}
    # One trace per deployment: every span received belongs to one of them.
    assert {s.trace_id for s in receiver.spans()} == set(trace_ids.values())

    for dep in deps:
        root = check_tree(traces[dep], docs[dep], parent="")
        assert root.attributes["shipyard.strategy"] in ("BlueGreen", "Canary")
        # The auditor's way from a record to the trace: every record carries the id.
        records = audit(server, dep)
        assert records, f"no audit records for {dep}"
        assert {r["detail"].get("trace_id") for r in records} == {trace_ids[dep]}, [
            (r["event_type"], r["detail"].get("trace_id")) for r in records
        ]

    # The promoted canary: one measurement span per measurement, under the analysis stage.
    measured = [
        m
        for s in docs[good]["stages"]
        if s["name"].startswith("analysis_")
        for m in s["detail"]["measurements"]
    ]
    spans = traces[good]
    measurement_spans = [s for s in spans if s.name == "analysis.measurement"]
    assert len(measurement_spans) == len(measured) > 0
    analysis_ids = {s.span_id for s in spans if s.name.startswith("analysis_")}
    assert {s.parent_span_id for s in measurement_spans} <= analysis_ids
    assert {s.attributes["shipyard.analysis.verdict"] for s in measurement_spans} == {"pass"}

    # The rolled-back canary: the analysis stage failed with the typed error's code, the root
    # says so too, and the rollback is a span of the same trace.
    error = docs[bad]["error"]
    assert error["type"] == "AnalysisFailed"
    spans = traces[bad]
    failed = [s for s in spans if s.status_code == ERROR and s.name.startswith("analysis_")]
    assert failed and {s.attributes["error.type"] for s in failed} == {error["code"]}
    root = next(s for s in spans if s.name == "deployment hello")
    assert (root.status_code, root.attributes["error.type"]) == (ERROR, error["code"])
    assert any("rollback" in s.name for s in spans), [s.name for s in spans]


def test_a_traceparent_on_deploy_makes_the_deployment_a_child_of_the_callers_span(
    traced: Server, receiver: otlp.OtlpReceiver, repo: Path
) -> None:
    server = traced
    first(server, repo)
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    assert server.client is not None
    r = server.client.post(
        "/api/v1/deploy",
        headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"},
        json={
            "source": {
                "repository": str(repo),
                "branch": "main",
                "commit": commit_version(repo, "v2"),
            },
            "target": {"service_name": "hello", "region": "local"},
            "strategy": {"BlueGreen": {"switch_delay_seconds": 0, "bake_seconds": 0}},
        },
    )
    assert r.status_code == 202, r.text
    dep = str(r.json()["deployment_id"])
    doc = server.wait_final(dep)
    assert doc["status"] == "Success", doc.get("error")
    assert doc["trace_id"] == caller_trace
    check_tree(trace_of(receiver, caller_trace), doc, parent=caller_span)
    assert {r["detail"].get("trace_id") for r in audit(server, dep)} == {caller_trace}


# --- Prometheus --------------------------------------------------------------------------------

#: Measurement windows of 4 s against a 1 s scrape: 4 samples per rate(), enough for a slope.
WINDOW_SECONDS = 4


@pytest.fixture
def prometheus(server: Server) -> Iterator[PrometheusServer]:
    """A Prometheus scraping ``server`` (tests/e2e/observability.py)."""
    with scraping(server) as prom:
        yield prom


def test_the_readme_canary_is_the_one_tested_here() -> None:
    """README.md's ``[[analysis.metrics]]`` example is a valid manifest, and its query is the
    ``ERROR_RATE`` these tests run (the README says so)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    start = readme.index("```toml\n[[analysis.metrics]]") + len("```toml\n")
    example = readme[start : readme.index("```", start)]
    manifest = parse_manifest(
        f'[service]\nname = "api"\n[run]\ncommand = "python3 app.py"\n{example}'
    )
    assert manifest.analysis is not None and manifest.analysis.metrics is not None
    (metric,) = manifest.analysis.metrics
    assert (metric.name, metric.provider) == ("error-rate", "prometheus")
    assert "".join(str(getattr(metric, "query", "")).split()) == "".join(ERROR_RATE.split())


def test_the_scrape_token_may_read_metrics_and_nothing_else(server: Server) -> None:
    """The token Prometheus scrapes with (``METRICS_PERMISSIONS``) reads ``/metrics`` and cannot
    deploy, roll back or administer anything."""
    token = issue_local(server.data_dir, "prometheus", METRICS_PERMISSIONS)
    with httpx.Client(base_url=server.base, headers={"authorization": f"Bearer {token}"}) as c:
        assert c.get("/metrics").status_code == 200
        assert c.post("/api/v1/deploy", json={}).status_code == 403
        assert c.post("/api/v1/rollback/0123456789abcdef").status_code == 403
        assert c.get("/api/v1/tokens").status_code == 403


def measurements(doc: dict[str, Any]) -> list[dict[str, Any]]:
    stage = next(s for s in doc["stages"] if s["name"].startswith("analysis_"))
    found: list[dict[str, Any]] = stage["detail"]["measurements"]
    return found


def error_rate_seen(prom: PrometheusServer, revision: str) -> float:
    """The candidate's 5xx share over the whole test, as Prometheus has it."""
    result = prom.query(error_rate_query(revision, "5m"))
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def test_a_canary_failing_a_promql_error_rate_is_rolled_back(
    traced: Server, receiver: otlp.OtlpReceiver, repo: Path
) -> None:
    """Rolled back on Prometheus's answer; the measurement that decided it is in the record, the
    audit trail and the trace (the server exports to ``receiver`` too)."""
    server = traced
    url = server.wait_final(first(server, repo))["result"]["url"]
    bad = commit_version(repo, "v-5xx", error_rate=1.0)  # /health stays green
    with scraping(server) as prometheus:
        strategy = promql_canary(prometheus, WINDOW_SECONDS, 3 * WINDOW_SECONDS)
        doc = server.wait_final(server.deploy_with(repo, bad, strategy), 180)
        assert doc["status"] == "RolledBack", doc.get("error")
        assert doc["error"]["type"] == "AnalysisFailed"
        assert "error-rate" in doc["error"]["message"]
        measured = measurements(doc)
        # Only the listed metric judged the canary, through Prometheus, and it failed on the
        # value Prometheus answered (the built-in router check did not run).
        assert {(m["metric"], m["provider"]) for m in measured} == {("error-rate", "prometheus")}
        last = measured[-1]
        assert last["verdict"] == "fail", measured
        assert float(last["value"]) >= 0.2
        sent = last["query"]
        assert 'code="5xx"' in sent and f'revision="{doc["green_revision"]}"' in sent
        assert f"[{WINDOW_SECONDS}s]" in sent
        # What Prometheus saw is what the candidate did: every answer a 5xx.
        assert error_rate_seen(prometheus, doc["green_revision"]) == pytest.approx(1.0)
    assert server.service()["weights"] == {doc["blue_revision"]: 100}
    assert httpx.get(url).text == "hello from v1\n"

    # The same measurement in the audit trail and in the trace.
    audited = [r for r in audit(server, doc["id"]) if r["event_type"] == "analysis.measurement"]
    assert audited[-1]["detail"]["metric"] == "error-rate"
    assert (audited[-1]["detail"]["verdict"], audited[-1]["detail"]["value"]) == (
        "fail",
        last["value"],
    )
    spans = [s for s in trace_of(receiver, doc["trace_id"]) if s.name == "analysis.measurement"]
    assert len(spans) == len(audited)
    decisive = max(spans, key=lambda s: s.start_ns)
    assert decisive.attributes["shipyard.analysis.metric"] == "error-rate"
    assert decisive.attributes["shipyard.analysis.verdict"] == "fail"
    assert decisive.attributes["shipyard.analysis.value"] == last["value"]


def test_a_canary_passing_a_promql_error_rate_is_promoted(
    server: Server, prometheus: PrometheusServer, repo: Path
) -> None:
    url = server.wait_final(first(server, repo))["result"]["url"]
    v2 = commit_version(repo, "v2")
    strategy = promql_canary(prometheus, WINDOW_SECONDS, 3 * WINDOW_SECONDS)
    doc = server.wait_final(server.deploy_with(repo, v2, strategy), 180)
    assert doc["status"] == "Success", doc.get("error")
    judged = [m for m in measurements(doc) if m["verdict"] != "insufficient_data"]
    assert judged, measurements(doc)
    assert {(m["metric"], m["verdict"]) for m in judged} == {("error-rate", "pass")}
    assert all(float(m["value"]) < 0.05 for m in judged)
    assert error_rate_seen(prometheus, doc["green_revision"]) == 0.0
    assert server.service()["weights"] == {doc["green_revision"]: 100}
    assert httpx.get(url).text == "hello from v2\n"
