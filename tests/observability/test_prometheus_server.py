"""The test Prometheus (tests/prometheus.py) is a real one: it scrapes with the bearer token it
is given, refuses nothing silently (a target answering 401 is ``down`` with the reason), and its
HTTP API answers PromQL over what it scraped."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from tests.prometheus import ScrapeTarget, available, own_prometheus

TOKEN = "s3cret-scrape-token"


class Exporter(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.headers.get("authorization") != f"Bearer {TOKEN}":
            self.send_response(401)
            self.end_headers()
            return
        body = b'# TYPE probe_value gauge\nprobe_value{kind="test"} 42\n'
        self.send_response(200)
        self.send_header("content-type", "text/plain; version=0.0.4")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def exporter() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Exporter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_prometheus_scrapes_with_the_token_and_answers_queries(exporter: str) -> None:
    assert available(), "apt-get install prometheus (scripts/bootstrap.sh does)"
    targets = [
        ScrapeTarget("good", exporter, token=TOKEN),
        ScrapeTarget("wrong-token", exporter, token="not-it"),
    ]
    with own_prometheus(targets) as prom:
        [sample] = prom.wait_for('probe_value{job="good"}', lambda r: len(r) == 1)
        assert sample["value"][1] == "42"
        assert prom.query('probe_value{job="wrong-token"}') == []
        health = prom.wait_for(
            "up",
            lambda r: (
                {s["metric"]["job"]: s["value"][1] for s in r} == {"good": "1", "wrong-token": "0"}
            ),
        )
        assert len(health) == 2
        down = next(t for t in prom.targets() if t["labels"]["job"] == "wrong-token")
        assert "401" in down["lastError"], down
