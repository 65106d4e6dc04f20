"""``shipyard logs``: lines printed with their time, replica and stream, app output shown and never
obeyed (Rich markup, terminal escapes), bad flags refused before any request, server problems
passed on, and ``--follow`` resuming from the cursor the server ends a stream with.

The API answers through ``httpx.MockTransport`` (as in test_safe_output.py); the command runs
through Typer's ``CliRunner``."""

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
PATH = "/api/v1/services/web/logs"
HOSTILE = "[red]spoof[/red]\x1b]0;owned\x07\x1b[2K\rSuccess"
SEEN = "[red]spoof[/red]\\x1b]0;owned\\x07\\x1b[2K\\x0dSuccess"


def _line(text: str, stream: str = "stdout", replica: str = "r1-1-abcd") -> dict[str, Any]:
    return {
        "timestamp": "2026-01-31T14:00:00.123456+00:00",
        "replica_id": replica,
        "revision": "r1",
        "stream": stream,
        "text": text,
    }


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")


def _serve(monkeypatch: pytest.MonkeyPatch, handler: Callable[[httpx.Request], httpx.Response]
           ) -> list[httpx.Request]:  # fmt: skip
    """Route the CLI's requests to ``handler``; the requests it got."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    class MockedClient(ApiClient):
        def __init__(self, server: str, token: str, ca_cert: Path | None = None) -> None:
            self._c = httpx.Client(base_url=server, transport=httpx.MockTransport(record))

    monkeypatch.setattr(main, "ApiClient", MockedClient)
    return seen


def test_lines_show_time_replica_stream_and_text_never_obeyed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = {
        "service": "web",
        "region": "local",
        "lines": [
            _line("Traceback (most recent call last):", "stderr"),
            _line(HOSTILE),
            _line("x" * 300),
        ],
        "cursor": "e30",
    }
    seen = _serve(monkeypatch, lambda _: httpx.Response(200, json=doc))
    result = runner.invoke(main.app, ["logs", "web", "--token", "t", "--tail", "3",
                                      "--since", "10m", "--revision", "r1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "2026-01-31T14:00:00.123Z r1-1-abcd err Traceback (most recent call last):"
    assert lines[1] == f"2026-01-31T14:00:00.123Z r1-1-abcd out {SEEN}"
    assert lines[2].endswith("x" * 300) and len(lines) == 3  # not wrapped
    for raw in ("\x1b", "\x07", "\r"):
        assert raw not in result.stdout
    assert dict(seen[0].url.params) == {"tail": "3", "since": "10m", "revision": "r1",
                                        "region": "local"}  # fmt: skip


def test_json_format_prints_one_object_per_line(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = {"service": "web", "region": "local", "lines": [_line(HOSTILE)], "cursor": "e30"}
    _serve(monkeypatch, lambda _: httpx.Response(200, json=doc))
    result = runner.invoke(main.app, ["logs", "web", "--token", "t", "--format", "json"])
    assert result.exit_code == 0, result.output
    [printed] = result.stdout.splitlines()
    assert json.loads(printed)["text"] == HOSTILE
    assert "\x1b" not in result.stdout


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        pytest.param(["--tail", "-1"], "--tail must be between 0 and 10000", id="negative-tail"),
        pytest.param(["--tail", "20000"], "--tail must be between 0 and 10000", id="tail-big"),
        pytest.param(["--since", "yesterday"], "--since: since 'yesterday' is not", id="since"),
        pytest.param(["--revision", "../x"], "is not a revision name", id="revision"),
        pytest.param(["--replica", "a b"], "is not a replica id", id="replica"),
        pytest.param(["--format", "xml"], "--format must be text or json", id="format"),
    ],
)
def test_bad_flags_are_refused_before_any_request(
    monkeypatch: pytest.MonkeyPatch, flags: list[str], says: str
) -> None:
    seen = _serve(monkeypatch, lambda _: httpx.Response(500))
    result = runner.invoke(main.app, ["logs", "web", "--token", "t", *flags])
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.stderr.split())
    assert seen == []


def test_a_server_problem_is_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = {"error": "not_found", "title": "Not Found", "status": 404,
               "detail": "no logs of revision r9 of web on this agent"}  # fmt: skip
    _serve(monkeypatch, lambda _: httpx.Response(404, json=problem))
    result = runner.invoke(main.app, ["logs", "web", "--token", "t", "--revision", "r9"])
    assert result.exit_code == 2
    assert "no logs of revision r9 of web on this agent" in result.stderr


def _ndjson(*records: dict[str, Any]) -> httpx.Response:
    body = "".join(json.dumps(r) + "\n" + "\n" for r in records)  # keep-alives between
    return httpx.Response(200, content=body.encode(), headers={"content-type": "x-ndjson"})


def test_follow_prints_the_stream_and_resumes_from_the_end_cursor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        params = dict(request.url.params)
        assert params["follow"] == "true"
        if "after" not in params:
            assert params["tail"] == "5"
            return _ndjson(
                {"type": "line", **_line("first")},
                {"type": "end", "reason": "follow_limit", "cursor": "CUR1"},
            )
        if params["after"] == "CUR1":
            assert "tail" not in params and "since" not in params  # resumed, not replayed
            return _ndjson(
                {"type": "line", **_line("second", "stderr")},
                {"type": "end", "reason": "follow_limit", "cursor": "CUR2"},
            )
        raise KeyboardInterrupt  # the user's Ctrl-C

    seen = _serve(monkeypatch, handler)
    result = runner.invoke(main.app, ["logs", "web", "--token", "t", "-f", "--tail", "5",
                                      "--since", "1h"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [line.split(" ", 3)[2:] for line in result.stdout.splitlines()] == [
        ["out", "first"],
        ["err", "second"],
    ]
    assert [dict(r.url.params).get("after") for r in seen] == [None, "CUR1", "CUR2"]


def test_follow_ends_with_exit_1_when_the_stream_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(monkeypatch, lambda _: _ndjson({"type": "line", **_line("a")},
                                          {"type": "error", "message": "agent gone"}))  # fmt: skip
    result = runner.invoke(main.app, ["logs", "web", "--token", "t", "--follow"])
    assert result.exit_code == 1
    assert "the logs stream failed: agent gone" in result.stderr
    _serve(monkeypatch, lambda _: _ndjson({"type": "line", **_line("a")}))  # cut short
    result = runner.invoke(main.app, ["logs", "web", "--token", "t", "--follow"])
    assert result.exit_code == 1
    assert "closed the logs stream" in result.stderr
