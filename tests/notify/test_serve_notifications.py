"""A real ``shipyard serve --config FILE`` and a real webhook receiver: notifications produced
while the receiver is down survive a ``kill -9`` of serve and are delivered, signed and
verifiable, once it is up and serve runs again; ``GET /deployments/{id}`` shows each one's state
along the way, and ``shipyard status`` too."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.cli.demo import _git, make_example_repo
from shipyard.notify import signing
from tests.e2e.support import Server, free_port, run_cli, wait_until

pytestmark = pytest.mark.e2e

SECRET = "whsec-e2e-receiver-0123456789"


class Receiver:
    """An HTTP server on ``port`` that keeps every POST (headers, body) and answers 200."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.got: list[tuple[dict[str, str], bytes]] = []
        got = self.got

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def events(self) -> list[str]:
        return [json.loads(body)["event"] for _, body in self.got]


@pytest.fixture
def config(tmp_path: Path) -> tuple[Path, int]:
    port = free_port()  # nobody listens there yet: the receiver is down
    path = tmp_path / "server.toml"
    path.write_text(
        # Retries at most 2 s apart: the receiver's return is seen within the test's bounds.
        "[notifications]\nretry_cap_seconds = 2\n\n"
        "[[notifications.sinks]]\n"
        'name = "receiver"\n'
        'type = "webhook"\n'
        f'url = "http://127.0.0.1:{port}/hook"\n'
        'secret_env = "RECEIVER_SECRET"\n'
        'events = ["deployment.started", "deployment.succeeded", "deployment.failed"]\n'
    )
    return path, port


@pytest.fixture
def serve(tmp_path: Path, config: tuple[Path, int]) -> Iterator[Server]:
    server = Server(tmp_path / "data", "--config", str(config[0]), env={"RECEIVER_SECRET": SECRET})
    try:
        yield server
    finally:
        server.stop()
        server.stop_agent()


def states(server: Server, dep_id: str) -> list[tuple[str, str, int]]:
    doc = server.deployment(dep_id)
    return [(n["event"], n["state"], n["attempts"]) for n in doc.get("notifications") or []]


def test_notifications_made_while_the_receiver_is_down_are_delivered_after_a_kill_9(
    serve: Server, config: tuple[Path, int], tmp_path: Path
) -> None:
    repo = make_example_repo(tmp_path / "hello-repo")
    serve.start()
    dep_id = serve.deploy(repo, _git(repo, "rev-parse", "HEAD"))
    assert serve.wait_final(dep_id)["status"] == "Success"

    # The receiver is down: both notifications wait, each tried at least once.
    def tried() -> bool:
        now = states(serve, dep_id)
        return len(now) == 2 and all(s == "pending" and a >= 1 for _, s, a in now)

    wait_until(tried, 60, "both notifications to be tried against the down receiver")
    doc = serve.deployment(dep_id)
    assert {n["last_error"] for n in doc["notifications"]} == {"connection failed (ConnectError)"}
    shown = run_cli(
        "status",
        dep_id,
        "--server",
        serve.base,
        "--data-dir",
        str(serve.data_dir),
        timeout=60,
    ).stdout
    assert "notify receiver deployment.succeeded: pending" in shown

    serve.kill9()
    with Receiver(config[1]) as receiver:
        serve.start()  # the same data directory and config: the outbox is where it was
        wait_until(
            lambda: (
                sorted(set(receiver.events())) == ["deployment.started", "deployment.succeeded"]
            ),
            60,
            "the receiver to get both notifications after the restart",
        )
        wait_until(
            lambda: all(s == "delivered" for _, s, _ in states(serve, dep_id)),
            30,
            "the deployment to show them delivered",
        )
    for headers, body in receiver.got:
        assert signing.verify(SECRET.encode(), headers, body)
        assert headers["x-shipyard-event"] == json.loads(body)["event"]
        payload = json.loads(body)
        assert payload["deployment"]["id"] == dep_id
        assert payload["deployment"]["service"] == "hello"
    audit = serve.client.get(f"/api/v1/deployments/{dep_id}/audit").json()  # type: ignore[union-attr]
    by_seq = {r["seq"]: r["hash"] for r in audit["records"]}
    for _, body in receiver.got:  # each names a record of the trail, with its hash
        record = json.loads(body)["audit"]
        assert by_seq[record["seq"]] == record["hash"]
    keys = {h["idempotency-key"] for h, _ in receiver.got}
    assert len(keys) == 2  # one per notification, however often each was sent
    log = (serve.data_dir / "serve.log").read_text()
    assert SECRET not in log


def cli(server: Server, *args: str, stdin: str | None = None, **env: str) -> Any:
    """``shipyard notifications ARGS`` against ``server`` (a token minted from its data dir)."""
    return subprocess.run(
        [sys.executable, "-m", "shipyard.cli.main", "notifications", *args, *where(server)],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "300", **env},  # one line per sink
    )


def where(server: Server) -> list[str]:
    return ["--server", server.base, "--data-dir", str(server.data_dir)]


def test_the_notifications_command_adds_lists_tests_and_removes_sinks(serve: Server) -> None:
    serve.start()
    port = free_port()
    slack_url = f"http://127.0.0.1:{port}/services/T9/B9/slackPathSecret"
    with Receiver(port) as receiver:
        added = cli(
            serve,
            "add",
            "cli-hook",
            "--url",
            f"http://127.0.0.1:{port}/hook",
            "--events",
            "deployment.failed,deployment.frozen",
            stdin=SECRET + "\n",
        )
        assert added.returncode == 0, added.stderr
        team = cli(serve, "add", "team", "--type", "slack", "--value-env", "SLACK", SLACK=slack_url)
        assert team.returncode == 0, team.stderr
        listed = cli(serve, "list")
        assert listed.returncode == 0, listed.stderr
        lines = sorted(line for line in listed.stdout.splitlines() if line.strip())
        assert lines[0].startswith(f"cli-hook webhook http://127.0.0.1:{port}/hook")
        assert "deployment.failed,deployment.frozen" in lines[0] and "api" in lines[0]
        assert lines[1].startswith("receiver webhook") and "config" in lines[1]
        assert lines[2].startswith("team slack http://127.0.0.1/...")
        assert SECRET not in listed.stdout and "slackPathSecret" not in listed.stdout

        sent = cli(serve, "test", "cli-hook")
        assert sent.returncode == 0, sent.stderr
        (headers, body), *_ = receiver.got
        assert headers["x-shipyard-event"] == "notification.test"
        assert signing.verify(SECRET.encode(), headers, body)
        to_slack = cli(serve, "test", "team")
        assert to_slack.returncode == 0, to_slack.stderr
        assert json.loads(receiver.got[-1][1]) == {"text": "Shipyard: notification.test"}

    down = cli(serve, "test", "receiver")  # the config's sink: nobody listens on its port
    assert down.returncode == 1
    assert "connection failed (ConnectError)" in down.stderr

    no_secret = cli(serve, "add", "other", "--url", "http://127.0.0.1:9/x", stdin="")
    assert no_secret.returncode == 2 and "empty" in no_secret.stderr
    assert cli(serve, "rm", "team").returncode == 0
    assert "team" not in cli(serve, "list").stdout
    gone = cli(serve, "rm", "team")
    assert gone.returncode == 2 and "no notification sink named 'team'" in gone.stderr
