"""A deployment's trace on fakes, read with the SDK's ``InMemorySpanExporter``: one trace per
deployment, a span per stage under the root (emitted at the end with the id fixed at submit),
measurement spans under their analysis, error status with the typed error's code, the same
trace after a restart, and a caller's ``traceparent`` as the root's parent."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from shipyard import tracing
from shipyard.domain.models import DeploymentRequest
from tests.orchestrator.world import PipelineWorld

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
STAGES = [{"weight": 10, "duration_seconds": 600}, {"weight": 50, "duration_seconds": 600}]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def world(tmp_path: Path, exporter: InMemorySpanExporter) -> AsyncIterator[PipelineWorld]:
    w = PipelineWorld(tmp_path, replicas=1, rps=100.0)
    w.tracer = tracing.provider(SimpleSpanProcessor(exporter)).get_tracer(tracing.SCOPE)
    w.pipeline = w.new_pipeline()
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()


def canary() -> dict[str, Any]:
    return {"Canary": {"stages": STAGES, "scale_down_delay_seconds": 30}}


def span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return trace.format_span_id(span.context.span_id)


def parent_id(span: ReadableSpan) -> str | None:
    return trace.format_span_id(span.parent.span_id) if span.parent is not None else None


def of_trace(exporter: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    """The spans of one trace, in the order they ended (stages end in the record's order;
    on the fake clock several start at the same instant)."""
    return [
        s
        for s in exporter.get_finished_spans()
        if s.context is not None and trace.format_trace_id(s.context.trace_id) == trace_id
    ]


def the_root(spans: Sequence[ReadableSpan], doc: dict[str, Any]) -> ReadableSpan:
    (root,) = [s for s in spans if span_id(s) == doc["trace_span_id"]]
    return root


def stage_spans(spans: Sequence[ReadableSpan], root: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if parent_id(s) == span_id(root)]


def request(commit: str, strategy: dict[str, Any]) -> DeploymentRequest:
    return DeploymentRequest.model_validate(
        {
            "source": {"repository": "/repo", "branch": "main", "commit": commit},
            "target": {"service_name": "api", "region": "local"},
            "strategy": strategy,
        }
    )


async def test_a_deployment_is_one_trace_with_a_span_per_stage_under_its_root(
    world: PipelineWorld, exporter: InMemorySpanExporter
) -> None:
    stable = await world.first()
    doc = await world.deploy("bbbb2222")
    assert doc["status"] == "Success", doc.get("error")
    trace_id = doc["trace_id"]
    assert re.fullmatch("[0-9a-f]{32}", trace_id)
    spans = of_trace(exporter, trace_id)
    root = the_root(spans, doc)
    assert root.name == "deployment api" and root.parent is None
    assert root.start_time == int(doc["created_ts"] * 1e9)
    assert root.end_time is not None and root.end_time >= root.start_time
    assert root.status.status_code is StatusCode.UNSET
    green = doc["green_revision"]
    assert {
        k: v for k, v in (root.attributes or {}).items() if not k.startswith("shipyard.metrics.")
    } == {
        "deployment.id": doc["id"],
        "deployment.status": "succeeded",
        "shipyard.deployment.id": doc["id"],
        "shipyard.deployment.kind": "deploy",
        "shipyard.service": "api",
        "shipyard.region": "local",
        "shipyard.status": "Success",
        "shipyard.revision": green,
        "shipyard.stable_revision": stable,
        "shipyard.artifact.digest": doc["artifact_digest"],
        "shipyard.strategy": "BlueGreen",
        "shipyard.rollback_count": 0,
        "vcs.ref.head.revision": doc["commit"],
        "vcs.repository.url.full": "/repo",
    }
    assert (root.attributes or {})["shipyard.metrics.total_duration_ms"] == doc["metrics"][
        "total_duration_ms"
    ]
    assert root.resource.attributes["service.name"] == "shipyard"

    # Every other span of the trace is a stage's, under the root, in the record's order.
    children = stage_spans(spans, root)
    assert len(children) == len(spans) - 1
    assert [s.name for s in children] == [s["name"] for s in doc["stages"]]
    for span, stage in zip(children, doc["stages"], strict=True):
        attributes = span.attributes or {}
        assert attributes["shipyard.stage"] == stage["name"]
        assert attributes["shipyard.stage.status"] == "succeeded"
        assert attributes["shipyard.deployment.id"] == doc["id"]
    by_name = {s.name: s.attributes or {} for s in children}
    assert by_name["build"]["shipyard.build.cache.artifact_hit"] is False
    assert by_name["build"]["shipyard.artifact.digest"] == doc["artifact_digest"]
    assert by_name["health_check"]["shipyard.health.replicas"] == 1
    assert by_name["health_check"]["shipyard.stage.attempts"] == 2
    assert by_name["switch"]["shipyard.weight.candidate"] == 100
    assert by_name["switch"]["shipyard.weight.stable"] == 0
    # The first deployment is a trace of its own.
    first = (await world.pipeline.history())[-1]
    assert first.trace_id not in (None, trace_id)


async def test_every_audit_record_of_a_deployment_names_its_trace(world: PipelineWorld) -> None:
    await world.first()
    doc = await world.deploy("bbbb2222")
    records = await world.events(doc["id"])
    assert len(records) >= 5
    assert {r.detail.get("trace_id") for r in records} == {doc["trace_id"]}


async def test_a_failed_stage_is_an_error_with_the_typed_errors_code_and_rollback_is_a_span(
    world: PipelineWorld, exporter: InMemorySpanExporter
) -> None:
    await world.first()
    doc = await world.deploy("eeee5555", wait=False)
    green = f"eeee555-{doc['id'][:8]}"
    world.prober.scripts[green] = lambda r, n: n < 5  # healthy at the gate, failing in the bake
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    spans = of_trace(exporter, doc["trace_id"])
    root = the_root(spans, final)
    bake, rollback = stage_spans(spans, root)[-2:]
    assert bake.name == "bake" and bake.status.status_code is StatusCode.ERROR
    assert (bake.attributes or {})["error.type"] == "health_check_failed"
    assert (bake.attributes or {})["shipyard.stage.status"] == "failed"
    assert rollback.name == "rollback" and rollback.status.status_code is StatusCode.UNSET
    assert (rollback.attributes or {})["shipyard.rollback.cause"] == "health_check_failed"
    assert (rollback.attributes or {})["shipyard.weight.stable"] == 100
    assert root.status.status_code is StatusCode.ERROR
    assert root.status.description == final["error"]["message"].partition("\n")[0]
    assert (root.attributes or {})["error.type"] == "health_check_failed"
    assert (root.attributes or {})["deployment.status"] == "failed"
    assert (root.attributes or {})["shipyard.status"] == "RolledBack"


async def test_canary_measurements_are_spans_under_their_analysis_stage(
    world: PipelineWorld, exporter: InMemorySpanExporter
) -> None:
    await world.first()
    doc = await world.submit("cccc3333", canary())
    world.profile(world.revision("cccc3333", doc), error_rate=0.2)
    final = await world.wait(doc["id"])
    assert final["status"] == "RolledBack"
    spans = of_trace(exporter, doc["trace_id"])
    (analysis,) = [s for s in spans if s.name == "analysis_1"]
    assert (analysis.attributes or {})["error.type"] == "analysis_failed"
    (measured,) = [s for s in spans if s.name == "analysis.measurement"]
    assert parent_id(measured) == span_id(analysis)
    attributes = measured.attributes or {}
    assert attributes["shipyard.analysis.verdict"] == "fail"
    assert attributes["shipyard.analysis.outcome"] == "failed"
    assert attributes["shipyard.analysis.stage"] == 1
    requests = attributes["shipyard.analysis.requests"]
    assert isinstance(requests, int) and requests > 0
    rate = attributes["shipyard.analysis.success_rate"]
    assert isinstance(rate, float) and rate < 0.99
    assert isinstance(attributes["shipyard.analysis.p99_ms"], float)
    reasons = attributes["shipyard.analysis.reasons"]
    assert isinstance(reasons, tuple | list) and any("success rate" in str(r) for r in reasons)
    weights = [s for s in spans if s.name == "canary_1"]
    assert (weights[0].attributes or {})["shipyard.weight.candidate"] == 10
    assert (weights[0].attributes or {})["shipyard.weight.stable"] == 90


async def test_a_restarted_control_plane_continues_the_same_trace(
    world: PipelineWorld, exporter: InMemorySpanExporter
) -> None:
    await world.first()
    doc = await world.submit("bebe2525", canary())
    await world.until(doc["id"], _measured(7))
    await world.pipeline.stop()
    world.pipeline = world.new_pipeline()  # the same tracer: the spans of both runs are seen
    await world.pipeline.start()
    final = await world.wait(doc["id"])
    assert final["status"] == "Success", final.get("error")
    assert final["trace_id"] == doc["trace_id"] and final["trace_span_id"] == doc["trace_span_id"]
    spans = of_trace(exporter, doc["trace_id"])
    root = the_root(spans, final)
    assert [s for s in spans if s.parent is None] == [root]
    # The stage the restart interrupted: its first span ends interrupted, the resumed run's
    # span starts when the stage first started and ends succeeded, both under the root.
    interrupted, resumed = [s for s in spans if s.name == "analysis_1"]
    assert (interrupted.attributes or {})["shipyard.stage.interrupted"] is True
    assert (resumed.attributes or {})["shipyard.stage.status"] == "succeeded"
    assert resumed.start_time == interrupted.start_time
    assert parent_id(interrupted) == parent_id(resumed) == span_id(root)
    # Every measurement, before and after the restart, is in the trace and in the audit trail
    # (the tallies count them; a resumed step once dropped measurements identical to an earlier
    # one from the audit trail: 68 of 120 were recorded).
    tallied = [
        s["detail"]["tallies"]["measurements"] for s in final["stages"] if "tallies" in s["detail"]
    ]
    measured = [s for s in spans if s.name == "analysis.measurement"]
    assert len(measured) == sum(tallied) == 120
    audited = [e for e in await world.events(doc["id"]) if e.event_type == "analysis.measurement"]
    assert len(audited) == 120
    analyses = {span_id(s) for s in spans if s.name.startswith("analysis_")}
    assert {parent_id(s) for s in measured} <= analyses


def _measured(n: int) -> Any:
    def enough(d: dict[str, Any]) -> bool:
        analysis = d["progress"].get("analysis") or {}
        return int(analysis.get("run", {}).get("measurements", 0)) >= n

    return enough


async def test_a_callers_traceparent_makes_the_root_its_child(
    world: PipelineWorld, exporter: InMemorySpanExporter
) -> None:
    record = await world.pipeline.submit(
        request("aaaa1111", {"BlueGreen": {"switch_delay_seconds": 0}}),
        "alice",
        traceparent=f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
        tracestate="ci=1",
    )
    assert record.trace_id == CALLER_TRACE and record.trace_parent_span_id == CALLER_SPAN
    final = await world.wait(record.id)
    assert final["status"] == "Success", final.get("error")
    spans = of_trace(exporter, CALLER_TRACE)
    root = the_root(spans, final)
    assert parent_id(root) == CALLER_SPAN
    assert root.parent is not None and root.parent.is_remote
    assert len(stage_spans(spans, root)) == len(final["stages"]) == len(spans) - 1


async def test_a_malformed_traceparent_is_ignored_and_a_new_trace_begins(
    world: PipelineWorld, exporter: InMemorySpanExporter
) -> None:
    record = await world.pipeline.submit(
        request("aaaa1111", {"BlueGreen": {"switch_delay_seconds": 0}}),
        "alice",
        traceparent=f"00-{CALLER_TRACE}-not-a-span-01",
    )
    final = await world.wait(record.id)
    assert final["trace_id"] != CALLER_TRACE and final["trace_parent_span_id"] is None
    assert the_root(of_trace(exporter, final["trace_id"]), final).parent is None


async def test_a_caller_that_does_not_sample_gets_a_trace_id_and_no_spans(
    world: PipelineWorld, exporter: InMemorySpanExporter
) -> None:
    record = await world.pipeline.submit(
        request("aaaa1111", {"BlueGreen": {"switch_delay_seconds": 0}}),
        "alice",
        traceparent=f"00-{CALLER_TRACE}-{CALLER_SPAN}-00",
    )
    final = await world.wait(record.id)
    assert final["status"] == "Success", final.get("error")
    assert final["trace_id"] == CALLER_TRACE and final["trace_flags"] == 0
    assert of_trace(exporter, CALLER_TRACE) == []
    assert {r.detail.get("trace_id") for r in await world.events(record.id)} == {CALLER_TRACE}


async def test_a_deployment_taken_over_by_another_replica_stays_one_trace(tmp_path: Path) -> None:
    """Replica ``a`` dies mid-bake; ``b`` takes the deployment over and finishes it. Each
    exports to its own exporter: ``a``'s stage spans and ``b``'s, and the root ``b`` emits,
    make one trace."""
    exported = {"a": InMemorySpanExporter(), "b": InMemorySpanExporter()}
    world = PipelineWorld(tmp_path, replicas=1, rps=100.0)
    pipelines = {}
    for name, exporter in exported.items():
        world.tracer = tracing.provider(SimpleSpanProcessor(exporter)).get_tracer(tracing.SCOPE)
        pipelines[name] = world.new_pipeline(name, 10.0)
        await pipelines[name].start()
    world.pipeline = pipelines["a"]
    try:
        await world.first()
        doc = await world.submit(
            "bbbb2222", {"BlueGreen": {"switch_delay_seconds": 0, "bake_seconds": 60}}
        )
        await world.until(doc["id"], lambda d: [s["name"] for s in d["stages"]][-1:] == ["bake"])
        await pipelines["a"].stop(release=False)  # kill -9: b takes over when the lease expires
        final = (await pipelines["b"].wait(doc["id"], timeout=60)).model_dump(mode="json")
        assert final["status"] == "Success", final.get("error")
    finally:
        await pipelines["b"].stop()
    by_a = of_trace(exported["a"], doc["trace_id"])
    by_b = of_trace(exported["b"], doc["trace_id"])
    assert not [s for s in by_a if s.parent is None]  # a never finished it: no root from a
    root = the_root(by_b, final)
    assert root.parent is None
    assert {parent_id(s) for s in by_a + by_b if s is not root} == {span_id(root)}
    *before, interrupted = by_a
    assert interrupted.name == "bake"  # cut short by the crash
    assert (interrupted.attributes or {})["shipyard.stage.interrupted"] is True
    resumed, *after = [s for s in by_b if s is not root]
    assert resumed.name == "bake" and resumed.start_time == interrupted.start_time
    names = [s.name for s in [*before, resumed, *after]]
    assert names == [s["name"] for s in final["stages"]]
