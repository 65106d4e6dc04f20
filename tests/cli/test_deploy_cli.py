"""``shipyard deploy``: the request body it sends (``--rebuild`` adds ``"rebuild": true``).

The API answers through ``httpx.MockTransport``: what is asserted is the body the command sends,
validated with the same ``DeploymentRequest`` model the server parses it with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from shipyard.cli import main
from shipyard.cli.client import ApiClient
from shipyard.domain.models import DeploymentRequest

runner = CliRunner()
DEPLOYMENT_ID = "0b8f3a56-6c2f-4a53-9d6f-1f2d4c3b2a10"
# A remote repository with --branch, --commit and --service given: no git, no manifest needed.
ARGS = [
    "deploy",
    "https://git.example.invalid/hello.git",
    "--branch",
    "main",
    "--commit",
    "3f2c1e0a9b8c",
    "--service",
    "hello",
    "--no-wait",
    "--token",
    "test-token",
]


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Bodies POSTed to /api/v1/deploy; the fake API accepts each with 202."""
    bodies: list[dict[str, Any]] = []

    def api(request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.path) == ("POST", "/api/v1/deploy")
        bodies.append(json.loads(request.content))
        return httpx.Response(
            202,
            json={
                "deployment_id": DEPLOYMENT_ID,
                "status_url": f"/api/v1/deployments/{DEPLOYMENT_ID}",
            },
        )

    class MockedClient(ApiClient):
        def __init__(self, server: str, token: str, ca_cert: Path | None = None) -> None:
            self._c = httpx.Client(base_url=server, transport=httpx.MockTransport(api))

    monkeypatch.setattr(main, "ApiClient", MockedClient)
    return bodies


def test_rebuild_sends_rebuild_true(sent: list[dict[str, Any]]) -> None:
    result = runner.invoke(main.app, [*ARGS, "--rebuild"])
    assert result.exit_code == 0, result.output
    assert DEPLOYMENT_ID in result.stdout
    [body] = sent
    assert body["rebuild"] is True
    assert DeploymentRequest.model_validate(body).rebuild is True


def test_without_rebuild_the_body_is_the_adr_request(sent: list[dict[str, Any]]) -> None:
    result = runner.invoke(main.app, ARGS)
    assert result.exit_code == 0, result.output
    [body] = sent
    assert set(body) == {"source", "target", "strategy"}
    assert DeploymentRequest.model_validate(body).rebuild is False


def test_a_url_with_credentials_is_refused_before_anything_is_sent(
    sent: list[dict[str, Any]],
) -> None:
    secret = "ghp_cliNeverSendsThis"
    args = [*ARGS]
    args[1] = f"https://ci:{secret}@git.example.invalid/hello.git"
    result = runner.invoke(main.app, args)
    assert result.exit_code == 2
    assert "https://***@git.example.invalid/hello.git" in result.stderr
    assert "credential helper" in result.stderr
    assert secret not in result.output
    assert sent == []


def test_repeated_region_sends_a_fleet(sent: list[dict[str, Any]]) -> None:
    result = runner.invoke(main.app, [*ARGS, "--region", "eu", "--region", "us"])
    assert result.exit_code == 0, result.output
    [body] = sent
    assert body["target"] == {"service_name": "hello", "regions": ["eu", "us"]}
    target = DeploymentRequest.model_validate(body).target
    assert target.is_fleet and target.region == "eu"


def test_one_region_sends_the_adr_target(sent: list[dict[str, Any]]) -> None:
    result = runner.invoke(main.app, [*ARGS, "--region", "eu"])
    assert result.exit_code == 0, result.output
    assert sent[0]["target"] == {"service_name": "hello", "region": "eu"}
    result = runner.invoke(main.app, ARGS)
    assert sent[1]["target"] == {"service_name": "hello", "region": "local"}
