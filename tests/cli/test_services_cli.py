"""``shipyard scale``, ``shipyard service delete`` (the API answers through
``httpx.MockTransport``: what is asserted is what the commands send and print) and ``shipyard
agent stop`` (against a real agent process)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.agent.helpers import TRUSTED_KEY
from typer.testing import CliRunner

from shipyard.cli import main, services
from shipyard.cli.client import ApiClient

runner = CliRunner()


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Request]:
    """Requests the commands send; the fake API answers scale and delete as the server does."""
    requests: list[httpx.Request] = []

    def api(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.method == "PUT":
            n = json.loads(request.content)["replicas"]
            return httpx.Response(
                200,
                json={"service": "web", "region": "local", "revision": "web-1", "previous": 1,
                      "replicas": n, "started": [f"web-1-{i}" for i in range(n - 1)],
                      "stopped": []},
            )  # fmt: skip
        return httpx.Response(
            200,
            json={"service": "web", "region": "local", "revisions": ["web-1"], "replicas": 2,
                  "url": "http://127.0.0.1:4000"},
        )  # fmt: skip

    class MockedClient(ApiClient):
        def __init__(self, server: str, token: str, ca_cert: Path | None = None) -> None:
            self._c = httpx.Client(base_url=server, transport=httpx.MockTransport(api))

    monkeypatch.setattr(main, "ApiClient", MockedClient)
    return requests


def said(text: str) -> str:
    return " ".join(text.split())


def test_scale_sends_the_count_and_says_what_changed(asked: list[httpx.Request]) -> None:
    result = runner.invoke(main.app, ["scale", "web", "3", "--region", "local", "--token", "t"])
    assert result.exit_code == 0, result.output
    [request] = asked
    assert (request.method, request.url.path) == ("PUT", "/api/v1/services/web/replicas")
    assert request.url.params["region"] == "local"
    assert json.loads(request.content) == {"replicas": 3}
    assert "web-1 runs 3 replica(s), was 1 (started 2)" in said(result.stderr)


@pytest.mark.parametrize("count", ["0", "65", "two"])
def test_scale_refuses_a_bad_count_before_asking(asked: list[httpx.Request], count: str) -> None:
    result = runner.invoke(main.app, ["scale", "web", count, "--token", "t"])
    assert result.exit_code == 2
    assert asked == []


def test_delete_with_yes_deletes_and_says_what_went(asked: list[httpx.Request]) -> None:
    result = runner.invoke(main.app, ["service", "delete", "web", "--yes", "--token", "t"])
    assert result.exit_code == 0, result.output
    [request] = asked
    assert (request.method, request.url.path) == ("DELETE", "/api/v1/services/web")
    out = said(result.stderr)
    assert "deleted web@local: 2 replica(s) of web-1 stopped" in out
    assert "route http://127.0.0.1:4000 removed" in out


def test_delete_without_a_terminal_needs_yes(asked: list[httpx.Request]) -> None:
    result = runner.invoke(main.app, ["service", "delete", "web", "--token", "t"])
    assert result.exit_code == 2
    assert "needs confirmation: run it in a terminal, or pass --yes" in said(result.stderr)
    assert asked == []


@pytest.mark.parametrize(("answer", "deleted"), [("n\n", False), ("\n", False), ("y\n", True)])
def test_delete_asks_in_a_terminal(
    asked: list[httpx.Request], monkeypatch: pytest.MonkeyPatch, answer: str, deleted: bool
) -> None:
    monkeypatch.setattr(services, "interactive", lambda: True)
    result = runner.invoke(main.app, ["service", "delete", "web", "--token", "t"], input=answer)
    assert "Delete service web in region local" in result.output
    assert (len(asked) == 1) is deleted
    assert result.exit_code == (0 if deleted else 2)


# --- agent stop ----------------------------------------------------------------------------------


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A real agent (no services), started as `shipyard agent` starts it."""
    data = tmp_path / "data"
    key = tmp_path / "trusted.pub"
    key.write_text(TRUSTED_KEY)
    log = (tmp_path / "agent.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "shipyard.cli.main", "agent", "--data-dir", str(data),
         "--region", "eu", "--trusted-key", str(key)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    info = data / "agents" / "eu" / "agent.json"
    deadline = time.monotonic() + 60
    while not info.exists():
        assert process.poll() is None, (tmp_path / "agent.log").read_text()
        assert time.monotonic() < deadline, "the agent did not start within 60 s"
        time.sleep(0.05)
    try:
        yield process, data
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        log.close()


def test_agent_stop_stops_the_running_agent(
    agent_process: tuple[subprocess.Popen[bytes], Path],
) -> None:
    process, data = agent_process
    pid = json.loads((data / "agents" / "eu" / "agent.json").read_text())["pid"]
    assert pid == process.pid

    result = runner.invoke(main.app, ["agent", "stop", "--data-dir", str(data), "--region", "eu"])

    assert result.exit_code == 0, result.output
    assert f"stopped the agent of region eu (pid {pid})" in said(result.stderr)
    assert "stop serve first" in said(result.stderr)
    assert process.wait(timeout=5) == 0  # exited on its own, gracefully
    assert not (data / "agents" / "eu" / "agent.json").exists()


def test_agent_stop_with_no_agent_says_so(tmp_path: Path) -> None:
    result = runner.invoke(main.app, ["agent", "stop", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0
    assert "no agent is running for region local" in said(result.stderr)


def test_agent_stop_never_signals_a_pid_a_stale_file_names(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        agent_dir = tmp_path / "agents" / "local"
        agent_dir.mkdir(parents=True)
        stale: dict[str, Any] = {"pid": other.pid, "api_url": "http://127.0.0.1:9"}
        (agent_dir / "agent.json").write_text(json.dumps(stale))
        (agent_dir / "agent.token").write_text("x")

        result = runner.invoke(main.app, ["agent", "stop", "--data-dir", str(tmp_path)])

        assert result.exit_code == 2
        assert f"pid {other.pid}" in said(result.stderr) and "not signalled" in result.stderr
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
