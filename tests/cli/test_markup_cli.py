"""Text the CLI prints is shown as written: Rich markup (``[service]``, ``[bold]``) and emoji
codes (``:warning:``) in help texts, error messages and build logs are not interpreted.
(``test_safe_output.py`` covers terminal escapes in what the server sends.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from rich.text import Text
from typer.testing import CliRunner

from shipyard.cli import main
from shipyard.cli.client import ApiClient

runner = CliRunner()
DEPLOYMENT_ID = "0b8f3a56-6c2f-4a53-9d6f-1f2d4c3b2a10"
#: Markup Rich would consume and emoji codes it would replace, were they not escaped.
TRICKY = "add [service] name, [bold]not bold[/bold] :warning: :smile:"


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")


def _help_texts(command: Any, path: str) -> Iterator[tuple[str, str]]:
    for text in [command.help, *(getattr(p, "help", None) for p in command.params)]:
        if text:
            yield path, text
    for name, sub in getattr(command, "commands", {}).items():
        yield from _help_texts(sub, f"{path} {name}")


def test_every_help_text_renders_as_written() -> None:
    """Typer renders help as Rich markup: a literal ``[`` must be written ``\\[``."""
    texts = list(_help_texts(typer.main.get_command(main.app), "shipyard"))
    assert len(texts) > 50  # every command and option was walked
    for path, text in texts:
        assert Text.from_markup(text).plain == text.replace("\\[", "["), path


def test_deploy_help_shows_the_manifest_key() -> None:
    result = runner.invoke(main.app, ["deploy", "--help"])
    assert result.exit_code == 0
    assert "[service] name of shipyard.toml" in result.stdout


def _api(doc: dict[str, Any], log: str, problem: dict[str, Any] | None = None) -> type[ApiClient]:
    def handler(request: httpx.Request) -> httpx.Response:
        if problem is not None:
            return httpx.Response(422, json=problem)
        if request.url.path.endswith("/logs"):
            return httpx.Response(200, json={"offset": len(log), "text": log, "building": False})
        return httpx.Response(200, json=doc)

    class MockedClient(ApiClient):
        def __init__(self, server: str, token: str, ca_cert: Path | None = None) -> None:
            self._c = httpx.Client(base_url=server, transport=httpx.MockTransport(handler))

    return MockedClient


def test_a_build_log_line_prints_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = {
        "id": DEPLOYMENT_ID,
        "deployment_id": DEPLOYMENT_ID,  # what the rollback POST answers
        "kind": "rollback",
        "service": "web",
        "region": "local",
        "status": "Failed",
        "stages": [],
        "error": {"type": "BuildFailed", "message": TRICKY},
        "metrics": {},
    }
    monkeypatch.setattr(main, "ApiClient", _api(doc, f"{TRICKY}\n"))
    # rollback follows its new deployment from the start, build log included (promote and
    # abort follow from where the deployment is, after its build)
    result = runner.invoke(main.app, ["rollback", DEPLOYMENT_ID, "--token", "t"])
    assert result.exit_code == 1
    assert f"build | {TRICKY}" in result.stderr
    assert f"BuildFailed: {TRICKY}" in result.stderr
    assert "\u26a0" not in result.stderr  # the emoji :warning: would have become


def test_an_error_message_prints_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = {"error": "invalid_input", "detail": TRICKY}
    monkeypatch.setattr(main, "ApiClient", _api({}, "", problem))
    result = runner.invoke(main.app, ["status", DEPLOYMENT_ID, "--token", "t"])
    assert result.exit_code == 2
    assert TRICKY in result.stderr
