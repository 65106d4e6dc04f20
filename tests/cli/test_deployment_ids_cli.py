"""Deployment ids in the CLI: ``history`` prints every id whole however narrow the terminal, and
``status``/``promote``/``abort`` take a prefix, the server resolving it (the API answers through
``httpx.MockTransport``, recording what was asked)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from shipyard.cli import main
from shipyard.cli.client import ApiClient

runner = CliRunner()
IDS = [
    "0b8f3a56-6c2f-4a53-9d6f-1f2d4c3b2a10",
    "7d1e0c44-90ab-4cde-8f01-23456789abcd",
]


def _deployment(dep_id: str, status: str = "Success") -> dict[str, Any]:
    return {
        "id": dep_id,
        "kind": "deploy",
        "service": "web",
        "region": "local",
        "status": status,
        "blue_revision": "web-1111",
        "green_revision": "web-2222222222222222",
        "stages": [],
        "error": None,
        "metrics": {"total_duration_ms": 1234},
        "result": {"revision": "web-2222222222222222", "url": "http://127.0.0.1:1"},
        "triggered_by": "a-rather-long-subject-name@example.com",
        "created_at": "2026-12-01T10:00:00.000000+00:00",
    }


def _api(
    routes: dict[tuple[str, str], Callable[[httpx.Request], httpx.Response]],
    asked: list[tuple[str, str]],
) -> type[ApiClient]:
    def handler(request: httpx.Request) -> httpx.Response:
        asked.append((request.method, request.url.path))
        route = routes.get((request.method, request.url.path))
        if route is None:
            return httpx.Response(404, json={"error": "not_found", "detail": "no such thing"})
        return route(request)

    class MockedClient(ApiClient):
        def __init__(self, server: str, token: str, ca_cert: Path | None = None) -> None:
            self._c = httpx.Client(base_url=server, transport=httpx.MockTransport(handler))

    return MockedClient


@pytest.mark.parametrize("columns", [40, 60, 80])
def test_history_never_cuts_an_id(monkeypatch: pytest.MonkeyPatch, columns: int) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    doc = {"deployments": [_deployment(i) for i in IDS]}
    asked: list[tuple[str, str]] = []
    monkeypatch.setattr(
        main,
        "ApiClient",
        _api({("GET", "/api/v1/deployments"): lambda _: httpx.Response(200, json=doc)}, asked),
    )
    result = runner.invoke(main.app, ["history", "web", "--token", "t"])
    assert result.exit_code == 0, result.output
    for dep_id in IDS:
        assert dep_id in result.stdout, result.stdout


def test_status_by_prefix_shows_the_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, str]] = []
    routes = {
        ("GET", "/api/v1/deployments/0b8f"): lambda _: httpx.Response(
            200, json=_deployment(IDS[0])
        ),
    }
    monkeypatch.setattr(main, "ApiClient", _api(routes, asked))
    result = runner.invoke(main.app, ["status", "0b8f", "--token", "t"])
    assert result.exit_code == 0, result.output
    assert IDS[0] in result.stdout
    assert asked == [("GET", "/api/v1/deployments/0b8f")]


def test_status_of_a_service_named_like_hex_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cafe`` could be an id prefix; no deployment starts with it, so it is the service."""
    service = {
        "service": "cafe",
        "region": "local",
        "url": "http://127.0.0.1:1",
        "serving_revision": "cafe-1",
        "weights": {"cafe-1": 100},
        "replicas": [],
        "warnings": [],
    }
    asked: list[tuple[str, str]] = []
    routes = {("GET", "/api/v1/services/cafe"): lambda _: httpx.Response(200, json=service)}
    monkeypatch.setattr(main, "ApiClient", _api(routes, asked))
    result = runner.invoke(main.app, ["status", "cafe", "--token", "t"])
    assert result.exit_code == 0, result.output
    assert "cafe@local" in result.stdout
    assert asked == [("GET", "/api/v1/deployments/cafe"), ("GET", "/api/v1/services/cafe")]


def test_status_of_an_ambiguous_prefix_lists_the_candidates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    problem = {
        "error": "ambiguous_deployment_id",
        "detail": f"deployment id prefix '0b8f' is ambiguous: it starts {IDS[0]}, {IDS[1]}; "
        "give more characters",
        "candidates": IDS,
    }
    asked: list[tuple[str, str]] = []
    routes = {("GET", "/api/v1/deployments/0b8f"): lambda _: httpx.Response(422, json=problem)}
    monkeypatch.setattr(main, "ApiClient", _api(routes, asked))
    result = runner.invoke(main.app, ["status", "0b8f", "--token", "t"])
    assert result.exit_code == 2
    assert IDS[0] in result.stderr and IDS[1] in result.stderr
    assert asked == [("GET", "/api/v1/deployments/0b8f")]  # not retried as a service


@pytest.mark.parametrize(("command", "final"), [("promote", "Success"), ("abort", "RolledBack")])
def test_promote_and_abort_by_prefix_follow_the_full_id(
    monkeypatch: pytest.MonkeyPatch, command: str, final: str
) -> None:
    asked: list[tuple[str, str]] = []
    full = f"/api/v1/deployments/{IDS[0]}"
    routes = {
        ("POST", f"/api/v1/deployments/0b8f3a/{command}"): lambda _: httpx.Response(
            202, json={"deployment_id": IDS[0], "status": "Paused"}
        ),
        ("GET", full): lambda _: httpx.Response(200, json=_deployment(IDS[0], final)),
        # read before acting, so that following it leaves out what already happened
        ("GET", "/api/v1/deployments/0b8f3a"): lambda _: httpx.Response(
            200, json=_deployment(IDS[0], "Paused")
        ),
        ("GET", f"{full}/logs"): lambda _: httpx.Response(
            200, json={"offset": 0, "text": "", "building": False}
        ),
    }
    monkeypatch.setattr(main, "ApiClient", _api(routes, asked))
    result = runner.invoke(main.app, [command, "0b8f3a", "--token", "t"])
    assert result.exit_code == 0, result.output
    assert IDS[0] in result.stderr
    assert ("GET", full) in asked


def test_status_of_an_unknown_full_id_says_the_deployment_is_not_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full id is never retried as a service name (it would say "never deployed")."""
    asked: list[tuple[str, str]] = []
    monkeypatch.setattr(main, "ApiClient", _api({}, asked))
    result = runner.invoke(main.app, ["status", IDS[0], "--token", "t"])
    assert result.exit_code == 2
    assert asked == [("GET", f"/api/v1/deployments/{IDS[0]}")]


@pytest.mark.parametrize("columns", [80, 120])
def test_service_status_shows_replica_ids_whole_and_where_a_crash_printed(
    monkeypatch: pytest.MonkeyPatch, columns: int
) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    revision = "6186257-c4c969f7"
    replicas: list[dict[str, Any]] = [
        {"replica_id": f"{revision}-1-848d", "ready": True, "restarts": 0},
        {"replica_id": f"{revision}-2-0ff9", "ready": False, "restarts": 3},
    ]
    doc = {
        "service": "alpha",
        "region": "local",
        "url": "http://127.0.0.1:34455",
        "serving_revision": revision,
        "weights": {revision: 100},
        "replicas": [
            {**r, "revision": revision, "state": "running", "port": 32893} for r in replicas
        ],
        "warnings": [],
    }
    asked: list[tuple[str, str]] = []
    routes = {("GET", "/api/v1/services/alpha"): lambda _: httpx.Response(200, json=doc)}
    monkeypatch.setattr(main, "ApiClient", _api(routes, asked))
    result = runner.invoke(main.app, ["status", "alpha", "--token", "t"])
    assert result.exit_code == 0, result.output
    for r in replicas:
        assert r["replica_id"] in result.stdout, result.stdout
    assert "…" not in result.stdout.split("\n", 2)[2]  # no cell of the table is cut
    assert f"shipyard logs alpha --replica {revision}-2-0ff9" in result.stdout
