"""``shipyard.tracing``: export configured from the standard ``OTEL_*`` variables only, a
deployment's trace ids from the caller's ``traceparent``, and root span ids fixed in advance."""

from __future__ import annotations

import re

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shipyard import tracing
from shipyard.errors import InvalidInput
from tests.otlp import otlp_receiver

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


# --- configuration -------------------------------------------------------------------------------


def test_nothing_is_exported_unless_configured() -> None:
    configured = tracing.configure({})
    assert configured.tracer is tracing.NOOP
    assert configured.exporters == ()
    assert tracing.check({}) is None


@pytest.mark.parametrize(
    ("environ", "endpoint"),
    [
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
            "http://collector:4318/v1/traces",
            id="base-endpoint-gets-v1-traces",
        ),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"},
            "http://collector:4318/v1/traces",
            id="trailing-slash",
        ),
        pytest.param(
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://ignored:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:9999/custom",
            },
            "http://traces:9999/custom",
            id="traces-endpoint-as-is",
        ),
        pytest.param(
            {"OTEL_TRACES_EXPORTER": "otlp"},
            "http://localhost:4318/v1/traces",
            id="exporter-named-default-endpoint",
        ),
    ],
)
def test_an_otlp_endpoint_turns_the_otlp_exporter_on(
    environ: dict[str, str], endpoint: str
) -> None:
    configured = tracing.configure(environ)
    try:
        assert configured.exporters == ("otlp",)
        assert configured.endpoint == endpoint
        assert configured.tracer is not tracing.NOOP
    finally:
        configured.shutdown()


def test_otel_traces_exporter_none_wins_over_an_endpoint() -> None:
    environ = {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}
    assert tracing.configure(environ).tracer is tracing.NOOP


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, id="grpc"),
        pytest.param({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, id="http-json"),
    ],
)
def test_a_protocol_shipyard_cannot_speak_is_refused_saying_what_to_set(
    environ: dict[str, str],
) -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", **environ}
    with pytest.raises(InvalidInput, match=r"=http/protobuf .*4318") as refused:
        tracing.check(environ)
    assert next(iter(k for k in environ if "PROTOCOL" in k)) in refused.value.message
    with pytest.raises(InvalidInput):
        tracing.configure(environ)


def test_an_unknown_exporter_is_refused() -> None:
    with pytest.raises(InvalidInput, match="jaeger"):
        tracing.configure({"OTEL_TRACES_EXPORTER": "otlp,jaeger"})


def test_check_says_where_spans_go_without_a_password_in_the_url() -> None:
    where = tracing.check({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://me:s3cret@collector:4318"})
    assert where == "OTLP/HTTP to https://***@collector:4318/v1/traces"


def test_the_service_name_comes_from_otel_service_name() -> None:
    with otlp_receiver() as receiver:
        configured = tracing.configure(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "cd-east"}
        )
        configured.tracer.start_span("probe").end()
        configured.shutdown()  # flushes the batch
        (span,) = receiver.wait_for(lambda spans: len(spans) == 1, timeout=30)
    assert span.name == "probe"
    assert span.resource["service.name"] == "cd-east"
    assert span.resource["service.version"]
    assert span.scope == tracing.SCOPE


# --- trace ids -----------------------------------------------------------------------------------


def test_a_valid_traceparent_makes_the_deployment_a_child_of_the_callers_span() -> None:
    ids = tracing.new_ids(f"00-{CALLER_TRACE}-{CALLER_SPAN}-01")
    assert ids.trace_id == CALLER_TRACE
    assert ids.parent_span_id == CALLER_SPAN
    assert ids.flags == 1
    assert re.fullmatch("[0-9a-f]{16}", ids.span_id) and ids.span_id != CALLER_SPAN


def test_an_unsampled_callers_flags_are_kept() -> None:
    assert tracing.new_ids(f"00-{CALLER_TRACE}-{CALLER_SPAN}-00").flags == 0


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(None, id="absent"),
        pytest.param("", id="empty"),
        pytest.param("garbage", id="garbage"),
        pytest.param(f"00-{'0' * 32}-{CALLER_SPAN}-01", id="zero-trace-id"),
        pytest.param(f"00-{CALLER_TRACE}-{'0' * 16}-01", id="zero-span-id"),
        pytest.param(f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01", id="version-ff"),
        pytest.param(f"00-{CALLER_TRACE.upper()}-{CALLER_SPAN}-01", id="upper-case"),
        pytest.param(f"00-{CALLER_TRACE}-{CALLER_SPAN}", id="no-flags"),
    ],
)
def test_a_missing_or_malformed_traceparent_starts_a_new_trace(header: str | None) -> None:
    ids = tracing.new_ids(header)
    assert ids.parent_span_id is None
    assert re.fullmatch("[0-9a-f]{32}", ids.trace_id) and ids.trace_id != CALLER_TRACE
    assert ids.flags & 1  # sampled
    assert tracing.new_ids(header).trace_id != ids.trace_id  # random, not derived


def test_a_span_started_under_fixed_ids_gets_them_and_no_other_does() -> None:
    exporter = InMemorySpanExporter()
    tracer = tracing.provider(SimpleSpanProcessor(exporter)).get_tracer("test")
    ids = tracing.new_ids(None)
    with tracing.fixed_ids(ids.trace_id, ids.span_id):
        tracer.start_span("root").end()
    child = tracer.start_span(
        "child", context=tracing.parent_context(ids.trace_id, ids.span_id, ids.flags)
    )
    child.end()
    other = tracer.start_span("unrelated")
    other.end()
    root, got_child, got_other = exporter.get_finished_spans()
    assert root.context is not None and got_child.context is not None
    assert trace.format_trace_id(root.context.trace_id) == ids.trace_id
    assert trace.format_span_id(root.context.span_id) == ids.span_id
    assert got_child.parent is not None and got_child.parent.span_id == root.context.span_id
    assert got_child.context.trace_id == root.context.trace_id
    assert got_other.context is not None
    assert got_other.context.trace_id != root.context.trace_id
    assert got_other.context.span_id != root.context.span_id
