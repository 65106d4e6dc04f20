"""Untrusted text printed by the CLI is shown, never obeyed: Rich markup and terminal escapes in
what the server or a repository sent (service names, subjects, repository URLs, error messages,
build log lines, stage names) reach the terminal as visible characters.

The API answers through ``httpx.MockTransport`` with hostile documents; the commands run through
Typer's ``CliRunner`` (Rich writes plain text there, so markup that was *not* escaped would be
consumed and vanish, and a control character would be in the output as the raw byte).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from shipyard.cli import main
from shipyard.cli.client import ApiClient
from shipyard.cli.safe import neutralised, shown

runner = CliRunner()
DEPLOYMENT_ID = "0b8f3a56-6c2f-4a53-9d6f-1f2d4c3b2a10"
MARKUP = "[red]spoof[/red]"
TITLE = "\x1b]0;owned\x07"  # sets the terminal window's title
OVERWRITE = "\x1b[2K\rSuccess"  # erases the line and writes over it
HOSTILE = f"{MARKUP}{TITLE}{OVERWRITE}"
#: What a user must see instead: every character visible, nothing interpreted.
SEEN = "[red]spoof[/red]\\x1b]0;owned\\x07\\x1b[2K\\x0dSuccess"
TITLE_SEEN = "\\x1b]0;owned\\x07"
DEPLOY = ["deploy", "https://git.example.invalid/x.git", "--branch", "main", "--commit",
          "3f2c1e0a9b8c", "--service", "web", "--token", "t"]  # fmt: skip
RAW_CONTROLS = ("\x1b", "\x07", "\r", "\x9b")


@pytest.mark.parametrize(
    ("text", "multiline", "expected"),
    [
        pytest.param("plain text", False, "plain text", id="plain"),
        pytest.param(MARKUP, False, "\\[red]spoof\\[/red]", id="markup-escaped"),
        pytest.param("\x1b[2J", False, "\\x1b[2J", id="clear-screen"),
        pytest.param("a\rb", False, "a\\x0db", id="carriage-return"),
        pytest.param("a\nb", False, "a\\x0ab", id="newline-in-a-name"),
        pytest.param("a\nb\tc", True, "a\nb\tc", id="newline-in-a-log"),
        pytest.param("a\x9b2Jb", True, "a\\x9b2Jb", id="c1-csi"),
        pytest.param("x\x7fy\x00", False, "x\\x7fy\\x00", id="del-and-nul"),
        pytest.param("abc\u202edcba", False, "abc\\u202edcba", id="bidi-override"),
        pytest.param(None, False, "None", id="none"),
        pytest.param(3, False, "3", id="number"),
    ],
)
def test_shown(text: object, multiline: bool, expected: str) -> None:
    assert shown(text, multiline=multiline) == expected


def test_shown_renders_what_was_sent() -> None:
    console = Console(record=True, width=300, force_terminal=True)
    console.print(f"[bold]deploying[/bold] {shown(HOSTILE)}")
    text = console.export_text()
    assert text == f"deploying {SEEN}\n"
    assert neutralised(HOSTILE) == SEEN


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines are not wrapped: each assertion finds a value whole."""
    monkeypatch.setenv("COLUMNS", "1000")


def _api(routes: dict[str, Callable[[httpx.Request], httpx.Response]]) -> type[ApiClient]:
    def handler(request: httpx.Request) -> httpx.Response:
        return routes[request.url.path](request)

    class MockedClient(ApiClient):
        def __init__(self, server: str, token: str, ca_cert: Path | None = None) -> None:
            self._c = httpx.Client(base_url=server, transport=httpx.MockTransport(handler))

    return MockedClient


def _deployment(status: str = "Failed") -> dict[str, Any]:
    return {
        "id": DEPLOYMENT_ID,
        "kind": "deploy",
        "service": f"web{HOSTILE}",
        "region": "local",
        "status": status,
        "blue_revision": f"r1{TITLE}",
        "green_revision": f"r2{MARKUP}",
        "stages": [
            {
                "name": f"build{HOSTILE}",
                "status": "failed",
                "duration_ms": 5,
                "detail": {"error": f"git said {HOSTILE}"},
            },
            {"name": "queued", "status": "running", "detail": {"position": f"1{HOSTILE}"}},
        ],
        "error": {"type": f"BuildFailed{MARKUP}", "message": f"boom\n{HOSTILE}"},
        "metrics": {"note": HOSTILE},
        "triggered_by": f"mallory{HOSTILE}",
        "created_at": "2024-01-01T00:00:00",
        "driver": {"replica": f"b{HOSTILE}", "lease_expires_at": "2024-01-01T00:00:10+00:00"},
    }


def _assert_neutral(output: str) -> None:
    for raw in RAW_CONTROLS:
        assert raw not in output, f"raw {raw!r} reached the terminal: {output!r}"


def test_status_of_a_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _deployment()
    monkeypatch.setattr(
        main,
        "ApiClient",
        _api({f"/api/v1/deployments/{DEPLOYMENT_ID}": lambda _: httpx.Response(200, json=doc)}),
    )
    result = runner.invoke(main.app, ["status", DEPLOYMENT_ID, "--token", "t"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    _assert_neutral(out)
    assert f"web{SEEN}@local" in out
    assert f"build{SEEN}" in out
    assert f"git said {SEEN}" in out
    assert f"BuildFailed{MARKUP}: boom\n{SEEN}" in out
    assert f"r1{TITLE_SEEN} -> r2{MARKUP}" in out
    assert f"position 1{SEEN} for a build slot" in out
    assert f"driven by b{SEEN} (lease until 2024-01-01T00:00:10+00:00)" in out


def test_status_of_a_service_table_and_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = {
        "service": "web",
        "region": "local",
        "url": f"http://127.0.0.1:1/{TITLE}",
        "serving_revision": f"r1{MARKUP}",
        "weights": {f"r1{MARKUP}": 100},
        "replicas": [
            {
                "replica_id": f"x{HOSTILE}",
                "revision": f"r1{MARKUP}",
                "state": f"up{TITLE}",
                "ready": True,
                "port": 1,
                "restarts": 0,
            },
        ],
        "warnings": [f"careful {HOSTILE}"],
    }
    monkeypatch.setattr(
        main, "ApiClient", _api({"/api/v1/services/web": lambda _: httpx.Response(200, json=doc)})
    )
    result = runner.invoke(main.app, ["status", "web", "--token", "t"])
    assert result.exit_code == 0, result.output
    _assert_neutral(result.output)
    assert f"r1{MARKUP}" in result.stdout
    assert f"up{TITLE_SEEN}" in result.stdout
    assert f"careful {SEEN}" in result.stderr


def test_history_table(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = {"deployments": [_deployment()]}
    monkeypatch.setattr(
        main, "ApiClient", _api({"/api/v1/deployments": lambda _: httpx.Response(200, json=doc)})
    )
    result = runner.invoke(main.app, ["history", "web", "--token", "t"])
    assert result.exit_code == 0, result.output
    _assert_neutral(result.stdout)
    assert f"mallory{SEEN}" in result.stdout
    assert f"r2{MARKUP}" in result.stdout


def test_an_error_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = {"error": "invalid_input", "detail": f"repository {HOSTILE} refused"}
    monkeypatch.setattr(
        main,
        "ApiClient",
        _api({f"/api/v1/deployments/{DEPLOYMENT_ID}": lambda _: httpx.Response(422, json=problem)}),
    )
    result = runner.invoke(main.app, ["status", DEPLOYMENT_ID, "--token", "t"])
    assert result.exit_code == 2
    _assert_neutral(result.stderr)
    assert f"repository {SEEN} refused" in result.stderr


def test_following_a_deployment_shows_its_build_log_and_stages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = _deployment()
    accepted = {"deployment_id": DEPLOYMENT_ID}
    path = f"/api/v1/deployments/{DEPLOYMENT_ID}"
    log = {"offset": 10, "text": f"step 1\n{HOSTILE}\nstep 3\n", "building": False}
    monkeypatch.setattr(
        main,
        "ApiClient",
        _api(
            {
                "/api/v1/deploy": lambda _: httpx.Response(202, json=accepted),
                path: lambda _: httpx.Response(200, json=doc),
                f"{path}/logs": lambda _: httpx.Response(200, json=log),
            }
        ),
    )
    result = runner.invoke(main.app, DEPLOY)
    assert result.exit_code == 1, result.output
    err = result.stderr
    _assert_neutral(err)
    assert f"build | {SEEN}" in err
    assert "build | step 3" in err
    assert f"build{SEEN}" in err
    assert f"Failed: BuildFailed{MARKUP}: boom\n{SEEN}" in err


def test_json_output_of_the_accepted_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    accepted = {"deployment_id": DEPLOYMENT_ID, "service": HOSTILE}
    monkeypatch.setattr(
        main, "ApiClient", _api({"/api/v1/deploy": lambda _: httpx.Response(202, json=accepted)})
    )
    args = [*DEPLOY, "--no-wait", "--format", "json"]
    result = runner.invoke(main.app, args)
    assert result.exit_code == 0, result.output
    _assert_neutral(result.stdout)
    assert json.loads(result.stdout) == accepted
