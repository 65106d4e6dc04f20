"""``shipyard promote/abort ID --reason TEXT`` and the Frozen status in the CLI (the API answers
through ``httpx.MockTransport``, recording what was asked and with which body)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from shipyard.cli import main
from shipyard.cli.client import ApiClient

runner = CliRunner()
IDS = ["0b8f3a56-6c2f-4a53-9d6f-1f2d4c3b2a10"]
FULL = f"/api/v1/deployments/{IDS[0]}"
Route = Callable[[httpx.Request], httpx.Response]


def _deployment(dep_id: str, status: str = "Success") -> dict[str, Any]:
    return {
        "id": dep_id,
        "kind": "deploy",
        "service": "web",
        "region": "local",
        "status": status,
        "blue_revision": "web-1111",
        "green_revision": "web-2222",
        "stages": [],
        "error": None,
        "metrics": {"total_duration_ms": 1234},
        "result": {"revision": "web-2222", "url": "http://127.0.0.1:1"},
        "triggered_by": "alice",
        "created_at": "2026-12-01T10:00:00.000000+00:00",
    }


def frozen(step: int, code: str = "analysis_failed") -> dict[str, Any]:
    doc = _deployment(IDS[0], "Frozen")
    doc["progress"] = {
        "phase": "steps",
        "step": step,
        "plan": {"steps": [{"type": "Analyse", "name": f"analysis_{i}"} for i in range(8)]},
        "frozen": {
            "cause": {"code": code, "message": "success rate 0.50 < 0.99"},
            "step": step,
            "at": "2026-12-01T10:05:00+00:00",
        },
    }
    return doc


def _api(routes: dict[tuple[str, str], Route], asked: list[tuple[str, str, Any]]) -> type:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        asked.append((request.method, request.url.path, body))
        route = routes.get((request.method, request.url.path))
        if route is None:
            return httpx.Response(404, json={"error": "not_found", "detail": "no such thing"})
        return route(request)

    class MockedClient(ApiClient):
        def __init__(self, server: str, token: str, ca_cert: Path | None = None) -> None:
            self._c = httpx.Client(base_url=server, transport=httpx.MockTransport(handler))

    return MockedClient


def routes(command: str, before: dict[str, Any], after: dict[str, Any]) -> dict[Any, Route]:
    return {
        ("POST", f"{FULL}/{command}"): lambda _: httpx.Response(
            202, json={"deployment_id": IDS[0], "status": before["status"]}
        ),
        ("GET", FULL): lambda _: httpx.Response(200, json=after),
        ("GET", f"{FULL}/logs"): lambda _: httpx.Response(
            200, json={"offset": 0, "text": "", "building": False}
        ),
    }


@pytest.mark.parametrize(("command", "final"), [("promote", "Success"), ("abort", "RolledBack")])
def test_reason_is_sent_as_the_body(
    monkeypatch: pytest.MonkeyPatch, command: str, final: str
) -> None:
    asked: list[tuple[str, str, Any]] = []
    monkeypatch.setattr(
        main, "ApiClient", _api(routes(command, frozen(3), _deployment(IDS[0], final)), asked)
    )
    result = runner.invoke(main.app, [command, IDS[0], "--reason", "INC-42 fixed", "--token", "t"])
    assert result.exit_code == 0, result.output
    assert ("POST", f"{FULL}/{command}", {"reason": "INC-42 fixed"}) in asked


def test_without_reason_no_body_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, str, Any]] = []
    paused = _deployment(IDS[0], "Paused")
    monkeypatch.setattr(
        main, "ApiClient", _api(routes("promote", paused, _deployment(IDS[0])), asked)
    )
    result = runner.invoke(main.app, ["promote", IDS[0], "--token", "t"])
    assert result.exit_code == 0, result.output
    assert ("POST", f"{FULL}/promote", None) in asked


def test_an_empty_reason_is_refused_before_asking(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, str, Any]] = []
    monkeypatch.setattr(main, "ApiClient", _api({}, asked))
    result = runner.invoke(main.app, ["abort", IDS[0], "--reason", "  ", "--token", "t"])
    assert result.exit_code == 2
    assert "--reason is empty" in result.stderr
    assert asked == []


def test_the_servers_refusal_without_a_reason_is_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    detail = f"deployment {IDS[0]} is Frozen: a promote needs a reason, which is audited"
    problem = {"error": "reason_required", "status": 409, "detail": detail}
    asked: list[tuple[str, str, Any]] = []
    monkeypatch.setattr(
        main,
        "ApiClient",
        _api(
            {
                ("POST", f"{FULL}/promote"): lambda _: httpx.Response(409, json=problem),
                ("GET", FULL): lambda _: httpx.Response(200, json=frozen(3)),
            },
            asked,
        ),
    )
    result = runner.invoke(main.app, ["promote", IDS[0], "--token", "t"])
    assert result.exit_code != 0
    assert "needs a reason" in result.stderr


def test_following_a_promote_stops_when_it_freezes_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A promoted Frozen deployment that fails its next check is Frozen again: following it
    ends there (exit 1) and says what a human can do."""
    asked: list[tuple[str, str, Any]] = []
    again = frozen(5, "traffic_switch_failed")
    monkeypatch.setattr(main, "ApiClient", _api(routes("promote", frozen(3), again), asked))
    # The read before acting shows the first freeze; following then sees the second one.
    before = frozen(3)
    monkeypatch.setattr(main, "_current", lambda client, dep_id, wait: before)
    result = runner.invoke(main.app, ["promote", IDS[0], "--reason", "go", "--token", "t"])
    assert result.exit_code == 1, result.output
    assert "Frozen" in result.stderr
    assert "traffic_switch_failed" in result.stderr
    assert f"shipyard abort {IDS[0]} --reason TEXT" in result.stderr


def test_status_of_a_frozen_deployment_says_why_and_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[tuple[str, str, Any]] = []
    doc = frozen(3)
    monkeypatch.setattr(
        main, "ApiClient", _api({("GET", FULL): lambda _: httpx.Response(200, json=doc)}, asked)
    )
    monkeypatch.setenv("COLUMNS", "400")
    result = runner.invoke(main.app, ["status", IDS[0], "--token", "t"])
    assert result.exit_code == 0, result.output
    assert "frozen at analysis_3: analysis_failed: success rate 0.50 < 0.99" in result.stdout
    assert f"shipyard promote {IDS[0]} --reason TEXT" in result.stdout
