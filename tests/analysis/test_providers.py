"""The ``prometheus`` and ``web`` analysis providers against real servers: a real Prometheus
(tests/prometheus.py) scraping a small exporter this test serves, and a local HTTP server
answering JSON. What a provider reads is then judged as the executor does (``judge_reading``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from shipyard.analysis.metrics import judge_reading, template_values
from shipyard.analysis.policy import MetricPolicy
from shipyard.analysis.providers import MetricProviderError, PrometheusProvider, WebProvider
from shipyard.analysis.verdicts import Verdict
from tests.prometheus import PrometheusServer, ScrapeTarget, available, own_prometheus

pytestmark = pytest.mark.skipif(not available(), reason="needs Debian's prometheus package")

CANARY, STABLE = "bbbb222-0a1b2c3d", "aaaa111-9f8e7d6c"


class _Server:
    """A loopback HTTP server answering ``GET`` with whatever ``answer(path)`` returns."""

    def __init__(self, answer: Callable[[str], tuple[int, str, bytes]]) -> None:
        self.answer = answer
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.paths.append(self.path)
                status, kind, body = outer.answer(self.path)
                self.send_response(status)
                self.send_header("content-type", kind)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Exporter:
    """Counters a canary and stable "serve", in Prometheus's text format; the test moves them."""

    def __init__(self) -> None:
        self.requests = {CANARY: 0, STABLE: 0}
        self.errors = {CANARY: 0, STABLE: 0}
        self.lock = threading.Lock()

    def serve(self, path: str) -> tuple[int, str, bytes]:
        with self.lock:
            lines = ["# TYPE demo_requests_total counter"]
            lines += [
                f'demo_requests_total{{service="api",revision="{r}"}} {n}'
                for r, n in self.requests.items()
            ]
            lines.append("# TYPE demo_errors_total counter")
            lines += [
                f'demo_errors_total{{service="api",revision="{r}"}} {n}'
                for r, n in self.errors.items()
            ]
            lines.append("# TYPE demo_error_ratio gauge")
            lines += [
                f'demo_error_ratio{{service="api",revision="{r}"}} '
                f"{self.errors[r] / self.requests[r] if self.requests[r] else 'NaN'}"
                for r in self.requests
            ]
        return 200, "text/plain; version=0.0.4", ("\n".join(lines) + "\n").encode()

    def traffic(self, revision: str, requests: int, errors: int) -> None:
        with self.lock:
            self.requests[revision] += requests
            self.errors[revision] += errors


@pytest.fixture(scope="module")
def exporter() -> Iterator[tuple[Exporter, _Server]]:
    e = Exporter()
    server = _Server(e.serve)
    yield e, server
    server.close()


@pytest.fixture(scope="module")
def prometheus(exporter: tuple[Exporter, _Server]) -> Iterator[PrometheusServer]:
    with own_prometheus([ScrapeTarget("demo", exporter[1].address)]) as prom:
        prom.wait_for("up{job='demo'}", lambda r: bool(r) and r[0]["value"][1] == "1")
        yield prom


def values(canary: str = CANARY, window: float = 5) -> dict[str, str | None]:
    return dict(
        template_values(
            service="api", canary=canary, stable=STABLE, region="local", interval_seconds=window
        )
    )


def prom_metric(address: str, query: str, **kw: Any) -> MetricPolicy:
    return MetricPolicy(
        name="error-rate",
        provider="prometheus",
        address=address,
        query=query,
        success_condition=kw.pop("success_condition", "result < 0.05"),
        **kw,
    )


ERROR_RATE = (
    'sum(rate(demo_errors_total{service="{{service}}",revision="{{canary}}"}[{{window}}])) / '
    'sum(rate(demo_requests_total{service="{{service}}",revision="{{canary}}"}[{{window}}]))'
)


async def test_a_promql_error_rate_fails_a_5xx_canary_and_passes_a_healthy_one(
    exporter: tuple[Exporter, _Server], prometheus: PrometheusServer
) -> None:
    """Counters move, Prometheus scrapes them, the provider's rate over {{window}} sees it."""
    e, _ = exporter
    metric = prom_metric(prometheus.address, ERROR_RATE, failure_condition="result >= 0.2")
    provider = PrometheusProvider()

    def rate_seen(revision: str, want: Callable[[float], bool]) -> None:
        q = f'rate(demo_requests_total{{revision="{revision}"}}[5s])'
        prometheus.wait_for(q, lambda r: bool(r) and want(float(r[0]["value"][1])), timeout=30)

    for _ in range(12):  # a 30% error rate for a few scrapes
        e.traffic(CANARY, 100, 30)
        time.sleep(0.5)
    rate_seen(CANARY, lambda v: v > 0)
    reading = await provider.read(metric, values())
    assert 'revision="bbbb222-0a1b2c3d"' in reading.sent and "[5s]" in reading.sent
    assert isinstance(reading.value, float) and 0.2 <= reading.value <= 0.4
    failed = judge_reading(metric, reading)
    assert failed.verdict is Verdict.FAIL
    assert failed.reasons == (
        f"failure_condition `result >= 0.2` holds for result = {reading.value!r}",
    )
    assert failed.to_dict()["metric"] == "error-rate" and failed.to_dict()["query"] == reading.sent

    for _ in range(14):  # then healthy: the 5 s window holds no more errors
        e.traffic(CANARY, 100, 0)
        time.sleep(0.5)
    healthy = prometheus.wait_for(
        f'increase(demo_errors_total{{revision="{CANARY}"}}[5s])',
        lambda r: bool(r) and float(r[0]["value"][1]) == 0,
        timeout=30,
    )
    assert healthy
    reading = await provider.read(metric, values())
    assert reading.value == 0.0
    assert judge_reading(metric, reading).verdict is Verdict.PASS


async def test_no_series_and_nan_are_insufficient_data_never_a_pass(
    prometheus: PrometheusServer,
) -> None:
    provider = PrometheusProvider()
    nothing = prom_metric(prometheus.address, 'demo_error_ratio{revision="{{canary}}"}')
    reading = await provider.read(nothing, values(canary="never-deployed"))
    assert reading.value is None
    assert judge_reading(nothing, reading).verdict is Verdict.INSUFFICIENT_DATA
    # 0/0: a revision that served nothing (stable's ratio is NaN until it gets traffic)
    nan = prom_metric(prometheus.address, "vector(0) / vector(0)")
    reading = await provider.read(nan, values())
    m = judge_reading(nan, reading)
    assert m.verdict is Verdict.INSUFFICIENT_DATA and m.to_dict()["value"] == "NaN"
    json.dumps(m.to_dict(), allow_nan=False)  # what the record and the audit log store


async def test_several_series_make_result_a_list_and_scalars_a_number(
    prometheus: PrometheusServer,
) -> None:
    provider = PrometheusProvider()
    both = prom_metric(
        prometheus.address,
        'sort_desc(demo_requests_total{service="{{service}}"}) >= 0',
        success_condition="len(result) == 2 and max(result) >= result[1]",
    )
    reading = await provider.read(both, values())
    assert isinstance(reading.value, list) and len(reading.value) == 2
    assert judge_reading(both, reading).verdict is Verdict.PASS
    scalar = prom_metric(prometheus.address, "scalar(vector(0.25))", success_condition="result < 1")
    assert (await provider.read(scalar, values())).value == 0.25


async def test_a_substituted_value_cannot_change_the_query(prometheus: PrometheusServer) -> None:
    """A hostile revision name stays inside its string literal: the query selects a series with
    that literal label value (none), instead of becoming ``... or vector(1)``."""
    provider = PrometheusProvider()
    metric = prom_metric(prometheus.address, 'demo_error_ratio{revision="{{canary}}"}')
    hostile = 'x"} or vector(1) or demo_error_ratio{revision="'
    reading = await provider.read(metric, values(canary=hostile))
    assert reading.value is None
    assert '\\"} or vector(1)' in reading.sent


async def test_prometheus_refusing_or_unreachable_is_a_provider_error(
    prometheus: PrometheusServer,
) -> None:
    provider = PrometheusProvider()
    with pytest.raises(MetricProviderError, match=r"refused the query \(400 bad_data\): .*parse"):
        await provider.read(prom_metric(prometheus.address, "sum(rate(x[5s])"), values())
    with pytest.raises(MetricProviderError, match="write an instant query"):
        await provider.read(prom_metric(prometheus.address, "demo_requests_total[5s]"), values())
    closed = _Server(lambda path: (200, "text/plain", b""))
    address = closed.address
    closed.close()
    with pytest.raises(MetricProviderError, match=f"prometheus at http://{address} is unreachable"):
        await provider.read(prom_metric(f"http://{address}", "up"), values())


async def test_stable_placeholder_without_a_stable_is_an_error(
    prometheus: PrometheusServer,
) -> None:
    metric = prom_metric(prometheus.address, 'up{revision="{{stable}}"}')
    with pytest.raises(MetricProviderError, match=r"\{\{stable\}\} has no value"):
        await PrometheusProvider().read(metric, {**values(), "stable": None})


# --- web -------------------------------------------------------------------------------------


def _json(status: int, doc: object) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(doc).encode()


@pytest.fixture
def web() -> Iterator[_Server]:
    def answer(path: str) -> tuple[int, str, bytes]:
        match path.split("?")[0]:
            case "/rate/bbbb222-0a1b2c3d":
                return _json(200, {"data": {"error_rate": 0.01, "series": [0.01, 0.02]}})
            case "/null":
                return _json(200, {"data": {"error_rate": None}})
            case "/object":
                return _json(200, {"data": {"error_rate": {"value": 1}}})
            case "/down":
                return _json(503, {"error": "maintenance"})
            case "/html":
                return 200, "text/html", b"<html>not json</html>"
            case "/slow":
                time.sleep(2)
                return _json(200, {"data": {"error_rate": 0}})
        return _json(404, {"error": "no such metric"})

    server = _Server(answer)
    yield server
    server.close()


def web_metric(
    server: _Server, path: str, json_path: str = "$.data.error_rate", **kw: Any
) -> MetricPolicy:
    return MetricPolicy(
        name="web-rate",
        provider="web",
        url=f"http://{server.address}{path}",
        json_path=json_path,
        success_condition=kw.pop("success_condition", "result < 0.05"),
        **kw,
    )


async def test_web_takes_the_value_at_the_json_path(web: _Server) -> None:
    provider = WebProvider()
    metric = web_metric(web, "/rate/{{canary}}", failure_condition="result > 0.5")
    reading = await provider.read(metric, values())
    assert reading.value == 0.01 and reading.sent.endswith("/rate/bbbb222-0a1b2c3d")
    assert judge_reading(metric, reading).verdict is Verdict.PASS
    series = web_metric(
        web, "/rate/{{canary}}", "$.data.series[*]", success_condition="max(result) < 0.05"
    )
    assert (await provider.read(series, values())).value == [0.01, 0.02]
    missing = web_metric(web, "/rate/{{canary}}", "$.data.p99")
    reading = await provider.read(missing, values())
    assert reading.value is None
    assert judge_reading(missing, reading).verdict is Verdict.INSUFFICIENT_DATA
    nulled = await provider.read(web_metric(web, "/null"), values())
    assert nulled.value is None


async def test_web_escapes_substituted_values_as_url_components(web: _Server) -> None:
    metric = web_metric(web, "/rate/{{canary}}")
    with pytest.raises(MetricProviderError, match="answered 404"):
        await WebProvider().read(metric, values(canary="../down?x=1#"))
    assert web.paths[-1] == "/rate/..%2Fdown%3Fx%3D1%23"


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        pytest.param("/down", "answered 503", id="5xx"),
        pytest.param("/html", "did not answer JSON", id="not-json"),
        pytest.param("/object", "selects an object: select numbers", id="object"),
        pytest.param("/slow", "did not answer within 0.5 s", id="timeout"),
    ],
)
async def test_web_failures_are_provider_errors(web: _Server, path: str, needle: str) -> None:
    with pytest.raises(MetricProviderError, match=needle):
        await WebProvider().read(web_metric(web, path, timeout_seconds=0.5), values())


async def test_an_answer_that_is_not_prometheus_is_not_echoed(web: _Server) -> None:
    """A metric pointed at something else (here a JSON endpoint) is an error that says so
    without copying what came back into the record and the audit log."""
    metric = prom_metric(f"http://{web.address}/rate/{CANARY}", "up")
    with pytest.raises(MetricProviderError) as caught:
        await PrometheusProvider().read(metric, values())
    assert "not a Prometheus API answer" in caught.value.message
    assert "no such metric" not in caught.value.message  # what that endpoint answered
