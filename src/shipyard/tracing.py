"""OpenTelemetry tracing for Shipyard: configuration from the standard ``OTEL_*`` variables,
the ids of a deployment's trace, and the SDK pieces that let a span's id be fixed in advance.

One trace per deployment. Its ids are chosen when the deployment is submitted (``new_ids``,
from the caller's W3C ``traceparent`` when it sent a valid one) and persisted in the record,
so every replica that drives the deployment -- after a restart, or a takeover -- parents its
spans on the same root (``parent_context``). The root span itself is emitted once, when the
deployment reaches its final status, by whichever replica finishes it: its id was fixed at
submit, and ``FixedIds`` (the provider's ``IdGenerator``) hands that id to the SDK when the root
is started under ``fixed_ids``. The orchestrator's spans are made in ``orchestrator/spans.py``.

Export (``configure``, called by ``api.context.build_context`` for ``shipyard serve``):

- ``OTEL_TRACES_EXPORTER``: ``otlp``, ``console`` or ``none`` (comma-separated). Unset: ``otlp``
  when an OTLP endpoint is set, else nothing is exported -- unlike the SDK's default, Shipyard
  never sends spans anywhere nobody configured. Trace ids are still made and recorded.
- ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (used as is) or ``OTEL_EXPORTER_OTLP_ENDPOINT`` (plus
  ``/v1/traces``); headers, timeout and certificates from their ``OTEL_EXPORTER_OTLP_*``
  variables, read by the SDK's exporter (headers may carry a collector's key: never logged).
- ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL``: ``http/protobuf`` (the default); ``grpc`` and
  ``http/json`` are refused at startup with what to set instead.
- ``OTEL_SERVICE_NAME`` (default ``shipyard``) and ``OTEL_RESOURCE_ATTRIBUTES``; the sampler
  (``OTEL_TRACES_SAMPLER``) and batching (``OTEL_BSP_*``) as the SDK reads them.

Spans are batched (``BatchSpanProcessor``) and flushed when ``serve`` stops (``shutdown``).
Without an exporter the tracer is the API's no-op tracer: tracing then costs nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import secrets
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shipyard import __version__
from shipyard.errors import InvalidInput

#: The instrumentation scope of every span Shipyard makes.
SCOPE = "shipyard"
#: ``service.name`` when ``OTEL_SERVICE_NAME`` is not set.
DEFAULT_SERVICE_NAME = "shipyard"
#: What a tracer that records nothing is (no exporter configured, unit tests of other parts).
NOOP: Tracer = trace.NoOpTracer()

_EXPORTERS = ("otlp", "console", "none")
_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True)
class TraceIds:
    """A deployment's place in a trace, as the record keeps it (lowercase hex)."""

    #: 32 hex digits: the caller's trace, or a new one.
    trace_id: str
    #: 16 hex digits: the deployment's root span, fixed before it exists.
    span_id: str
    #: The caller's span (from its ``traceparent``); None: the root is the trace's root.
    parent_span_id: str | None
    #: W3C trace flags (bit 0: sampled).
    flags: int


def new_ids(traceparent: str | None = None, tracestate: str | None = None) -> TraceIds:
    """The ids of a new deployment's trace: a child of the caller's span when ``traceparent``
    is a valid W3C header, else a new trace (a malformed one is ignored, as the W3C spec says).
    Called by ``Pipeline.submit``."""
    span_id = _random_span_id()
    if traceparent:
        carrier = {"traceparent": traceparent}
        if tracestate:
            carrier["tracestate"] = tracestate
        parent = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
        if parent.is_valid:
            return TraceIds(
                trace_id=trace.format_trace_id(parent.trace_id),
                span_id=span_id,
                parent_span_id=trace.format_span_id(parent.span_id),
                flags=int(parent.trace_flags),
            )
    trace_id = secrets.randbits(128) or 1
    return TraceIds(
        trace_id=trace.format_trace_id(trace_id),
        span_id=span_id,
        parent_span_id=None,
        # Sampled, and the id is random (W3C Trace Context level 2): what the SDK sets itself.
        flags=TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID,
    )


def _random_span_id() -> str:
    return trace.format_span_id(secrets.randbits(64) or 1)


def parent_context(trace_id: str, span_id: str, flags: int, *, remote: bool = False) -> Context:
    """A context whose current span is ``span_id`` of ``trace_id`` (not recording): spans
    started in it are its children, whoever started the span itself and whenever."""
    span_context = SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=remote,
        trace_flags=TraceFlags(flags),
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context))


# --- a span whose id was chosen before it starts ------------------------------------------

_FIXED: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "shipyard_fixed_span_ids", default=None
)


class FixedIds(RandomIdGenerator):
    """The SDK's random ids, except inside ``fixed_ids``: there the span started gets the ids
    given (the trace id is used only when the span has no parent). A context variable, so
    another task starting a span meanwhile gets random ids as usual."""

    def generate_span_id(self) -> int:
        fixed = _FIXED.get()
        return fixed[1] if fixed is not None else super().generate_span_id()

    def generate_trace_id(self) -> int:
        fixed = _FIXED.get()
        return fixed[0] if fixed is not None else super().generate_trace_id()


@contextlib.contextmanager
def fixed_ids(trace_id: str, span_id: str) -> Iterator[None]:
    """Start exactly one span in here: it gets these ids (with a provider made by
    ``provider``)."""
    token = _FIXED.set((int(trace_id, 16), int(span_id, 16)))
    try:
        yield
    finally:
        _FIXED.reset(token)


# --- the provider --------------------------------------------------------------------------


def provider(
    *processors: SpanProcessor, service_name: str = DEFAULT_SERVICE_NAME
) -> TracerProvider:
    """A tracer provider with Shipyard's resource and ``FixedIds``, feeding ``processors``
    (``configure`` for serve; tests hand it an ``InMemorySpanExporter``'s processor)."""
    resource = Resource.create({SERVICE_NAME: service_name, SERVICE_VERSION: __version__})
    made = TracerProvider(resource=resource, id_generator=FixedIds())
    for processor in processors:
        made.add_span_processor(processor)
    return made


@dataclass
class Tracing:
    """What ``configure`` set up: the tracer the pipeline uses and what to flush at exit."""

    tracer: Tracer
    #: The exporters in use (empty: spans are not exported).
    exporters: tuple[str, ...] = ()
    #: Where OTLP spans go (None: not OTLP).
    endpoint: str | None = None
    _provider: TracerProvider | None = None

    def shutdown(self) -> None:
        """Export what is still batched, then stop (``serve``'s shutdown)."""
        if self._provider is not None:
            self._provider.shutdown()


def configure(environ: Mapping[str, str]) -> Tracing:
    """Tracing as ``environ``'s ``OTEL_*`` variables ask (see the module docstring);
    ``InvalidInput`` saying what to set when they ask for something Shipyard cannot do."""
    names = _exporter_names(environ)
    if not names:
        return Tracing(NOOP)
    exporters: list[SpanExporter] = []
    endpoint: str | None = None
    for name in names:
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        else:
            endpoint = otlp_endpoint(environ)
            exporters.append(_otlp_exporter(environ, endpoint))
    service_name = environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME
    made = provider(*(BatchSpanProcessor(e) for e in exporters), service_name=service_name)
    return Tracing(made.get_tracer(SCOPE, __version__), tuple(names), endpoint, made)


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not raw:
        configured = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if configured else []
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in _EXPORTERS]
    if unknown:
        raise InvalidInput(
            f"OTEL_TRACES_EXPORTER={raw!r}: Shipyard exports traces with "
            f"{', '.join(_EXPORTERS)}; unknown: {', '.join(unknown)}"
        )
    if "none" in names:
        return []
    return list(dict.fromkeys(names))


def otlp_endpoint(environ: Mapping[str, str]) -> str:
    """Where OTLP/HTTP spans go: the traces endpoint as given, else the base endpoint's
    ``/v1/traces`` (the OTLP exporter spec), else the collector's default on this host."""
    traces = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if traces:
        return traces
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
    return base.rstrip("/") + "/v1/traces"


def check(environ: Mapping[str, str]) -> str | None:
    """Refuse (``InvalidInput``, saying what to set) what ``configure`` could not do, before
    ``shipyard serve`` starts anything; answers where spans will go, in words (None: nowhere)."""
    names = _exporter_names(environ)
    if "otlp" in names:
        _check_protocol(environ)
    where = [
        f"OTLP/HTTP to {_without_userinfo(otlp_endpoint(environ))}" if n == "otlp" else n
        for n in names
    ]
    return ", ".join(where) or None


def _without_userinfo(url: str) -> str:
    """``url`` fit for a log line: a password in it replaced (collectors' keys belong in
    ``OTEL_EXPORTER_OTLP_HEADERS``, but people put them in URLs too)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def _check_protocol(environ: Mapping[str, str]) -> None:
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(name, "").strip()
        if not protocol:
            continue
        if protocol != "http/protobuf":
            raise InvalidInput(
                f"{name}={protocol!r} is not supported: Shipyard exports traces over OTLP/HTTP "
                f"with protobuf only. Set {name}=http/protobuf (or unset it) and point "
                "OTEL_EXPORTER_OTLP_ENDPOINT at the collector's OTLP/HTTP port (4318 by "
                "default, not gRPC's 4317)"
            )
        return  # the traces-specific variable wins over the general one


def _otlp_exporter(environ: Mapping[str, str], endpoint: str) -> SpanExporter:
    _check_protocol(environ)
    # Imported here: the exporter pulls in protobuf and requests, needed only when exporting.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint)


def scalar(value: object) -> str | bool | int | float | None:
    """``value`` as a span attribute value when it is one (str, bool, int, float), else None:
    lists and mappings of a stage's detail stay in the record."""
    if isinstance(value, str | bool | int | float):
        return value
    return None
