"""A real OTLP/HTTP trace receiver for tests: what a collector's ``otlphttp`` receiver does.

``with otlp_receiver() as receiver:`` listens on a loopback port; point a process at it with
``OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint``. Every ``POST /v1/traces`` body (protobuf,
gzip-compressed or not) is decoded as the OTLP spec's ``ExportTraceServiceRequest`` and
answered with an ``ExportTraceServiceResponse``; anything else is a 404/415 as a collector
answers, and kept in ``refused`` so a test can see a misdirected exporter.

``spans()`` is every span received so far, flattened (``ReceivedSpan``: hex ids, attributes as
Python values, the resource's attributes beside them); ``wait_for(accept)`` blocks until the
spans received satisfy ``accept`` (woken by each export, never polling). Used by the tracing
tests (``tests/e2e/test_tracing_export.py``) and the end-to-end observability tests.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    #: "" for a span without a parent.
    parent_span_id: str
    start_ns: int
    end_ns: int
    #: ``STATUS_CODE_UNSET`` (0), ``OK`` (1) or ``ERROR`` (2).
    status_code: int
    status_message: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    flags: int = 0


@dataclass
class OtlpReceiver:
    """What the receiver got (thread-safe); see the module docstring."""

    endpoint: str = ""
    requests: list[ExportTraceServiceRequest] = field(default_factory=list)
    #: (method, path, content type) of every request that was not an OTLP/HTTP trace export.
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def received(self, request: ExportTraceServiceRequest) -> None:
        with self._changed:
            self.requests.append(request)
            self._changed.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return [s for r in self.requests for s in _flatten(r)]

    def wait_for(
        self, accept: Callable[[list[ReceivedSpan]], bool], timeout: float
    ) -> list[ReceivedSpan]:
        """The spans once ``accept(spans)`` holds; AssertionError naming what came otherwise."""
        with self._changed:
            if self._changed.wait_for(lambda: accept(self._all()), timeout):
                return self._all()
            got = sorted({s.name for s in self._all()})
        raise AssertionError(
            f"the OTLP receiver did not get the spans expected within {timeout}s; got "
            f"{len(self.requests)} export(s) with spans {got}, refused {self.refused}"
        )

    def _all(self) -> list[ReceivedSpan]:
        return [s for r in self.requests for s in _flatten(r)]


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return _attributes(v.kvlist_value.values)
    return getattr(v, kind)


def _attributes(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    kv: KeyValue
    for kv in kvs:
        out[kv.key] = _value(kv.value)
    return out


def _flatten(request: ExportTraceServiceRequest) -> Iterator[ReceivedSpan]:
    for rs in request.resource_spans:
        resource = _attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for span in ss.spans:
                yield ReceivedSpan(
                    name=span.name,
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano,
                    status_code=span.status.code,
                    status_message=span.status.message,
                    attributes=_attributes(span.attributes),
                    resource=resource,
                    scope=ss.scope.name,
                    flags=span.flags,
                )


def _handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length)
            kind = (self.headers.get("content-type") or "").split(";")[0].strip()
            if self.path != "/v1/traces":
                receiver.refused.append(("POST", self.path, kind))
                self._answer(404, b"", "text/plain")
                return
            if kind != PROTOBUF:
                receiver.refused.append(("POST", self.path, kind))
                self._answer(415, b"", "text/plain")
                return
            if (self.headers.get("content-encoding") or "").lower() == "gzip":
                body = gzip.decompress(body)
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            receiver.received(request)
            self._answer(200, ExportTraceServiceResponse().SerializeToString(), PROTOBUF)

        def do_GET(self) -> None:
            receiver.refused.append(("GET", self.path, ""))
            self._answer(405, b"", "text/plain")

        def _answer(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the test's output is the assertions, not an access log

    return Handler


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """An OTLP/HTTP receiver on a loopback port for the ``with`` block."""
    receiver = OtlpReceiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(receiver))
    server.daemon_threads = True
    receiver.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
