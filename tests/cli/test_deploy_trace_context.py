"""``shipyard deploy`` in a traced CI job: ``TRACEPARENT``/``TRACESTATE`` from the environment
go to ``POST /api/v1/deploy`` as the W3C headers (the API answers through
``httpx.MockTransport``); without them, no trace header is sent."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from shipyard.cli import main
from shipyard.cli.client import ApiClient, trace_context

runner = CliRunner()
DEPLOYMENT_ID = "0b8f3a56-6c2f-4a53-9d6f-1f2d4c3b2a10"
ARGS = [
    "deploy",
    "https://git.example.invalid/hello.git",
    *("--branch", "main", "--commit", "3f2c1e0a9b8c", "--service", "hello"),
    *("--no-wait", "--token", "test-token"),
]
PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def headers(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Headers]:
    """The headers of each POST /api/v1/deploy; the fake API accepts it with 202."""
    seen: list[httpx.Headers] = []

    def api(request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.path) == ("POST", "/api/v1/deploy")
        seen.append(request.headers)
        return httpx.Response(
            202,
            json={"deployment_id": DEPLOYMENT_ID, "status_url": f"/x/{DEPLOYMENT_ID}"},
        )

    class MockedClient(ApiClient):
        def __init__(self, server: str, token: str, ca_cert: Path | None = None) -> None:
            self._c = httpx.Client(base_url=server, transport=httpx.MockTransport(api))

    monkeypatch.setattr(main, "ApiClient", MockedClient)
    monkeypatch.delenv("TRACEPARENT", raising=False)
    monkeypatch.delenv("TRACESTATE", raising=False)
    return seen


def test_traceparent_from_the_environment_is_sent(
    headers: list[httpx.Headers], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACEPARENT", PARENT)
    monkeypatch.setenv("TRACESTATE", "ci=github")
    result = runner.invoke(main.app, ARGS)
    assert result.exit_code == 0, result.output
    [sent] = headers
    assert (sent["traceparent"], sent["tracestate"]) == (PARENT, "ci=github")


def test_without_traceparent_no_trace_header_is_sent(headers: list[httpx.Headers]) -> None:
    result = runner.invoke(main.app, ARGS)
    assert result.exit_code == 0, result.output
    [sent] = headers
    assert "traceparent" not in sent and "tracestate" not in sent


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({}, {}, id="none"),
        pytest.param({"TRACEPARENT": f" {PARENT}\n"}, {"traceparent": PARENT}, id="trimmed"),
        pytest.param({"TRACEPARENT": "a\rb"}, {}, id="not-a-header-value"),
        pytest.param({"TRACEPARENT": "00-é"}, {}, id="not-ascii"),
        pytest.param({"TRACESTATE": "k=v"}, {"tracestate": "k=v"}, id="state-alone"),
    ],
)
def test_trace_context_headers(environ: dict[str, str], expected: dict[str, str]) -> None:
    assert trace_context(environ) == expected
