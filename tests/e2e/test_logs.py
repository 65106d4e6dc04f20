"""App logs for real: ``shipyard serve``, its agent, sandboxed app processes and the ``shipyard``
command as a user runs it. A release that dies at start with a Python traceback: ``shipyard
deploy`` prints the traceback and the exit code, the deployment's error carries them, ``shipyard
status`` shows them. A running app's output: ``shipyard logs`` prints it, ``--follow`` prints
lines as the app writes them."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from shipyard.cli.demo import _git
from tests.e2e.support import Server, wait_until

#: What a newcomer's app does when its configuration is missing.
CRASHING_APP = """\
import os
print("starting notes", flush=True)
database = os.environ["DATABASE_URL"]
"""

#: Prints one line per request on stdout, and one at start on stderr.
CHATTY_APP = """\
import os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        print(f"GET {self.path}", flush=True)
        self.send_response(200)
        self.send_header("content-length", "3")
        self.end_headers()
        self.wfile.write(b"ok\\n")

    def log_message(self, *args):
        pass

print("ready on", os.environ["PORT"], file=sys.stderr, flush=True)
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


def _commit_app(repo: Path, source: str, message: str) -> str:
    (repo / "app.py").write_text(source)
    _git(repo, "commit", "-qam", message)
    return _git(repo, "rev-parse", "HEAD")


def _shipyard(server: Server, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_command(server, *args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )


def _command(server: Server, *args: str) -> list[str]:
    """``shipyard ARGS`` against ``server``, with a token minted from its data directory."""
    where = ["--server", server.base, "--data-dir", str(server.data_dir)]
    return [sys.executable, "-m", "shipyard.cli.main", *args, *where]


def test_a_crash_at_start_shows_its_traceback_and_exit_code(server: Server, repo: Path) -> None:
    _commit_app(repo, CRASHING_APP, "needs a database")
    deployed = _shipyard(server, "deploy", str(repo), "--bake", "1", "--scale-down-delay", "1")
    assert deployed.returncode == 1, deployed.stdout + deployed.stderr
    said = deployed.stderr
    assert "exit code 1" in said, said
    assert "Traceback (most recent call last):" in said, said
    assert said.count("KeyError: 'DATABASE_URL'") == 1, said  # in the outcome, not each stage
    assert "starting notes" in said, said

    assert server.client is not None
    [doc] = server.client.get("/api/v1/deployments", params={"service": "hello"}).json()[
        "deployments"
    ]
    error = doc["error"]
    assert error["type"] == "HealthCheckFailed"
    assert error["exit_code"] == 1
    assert "Traceback (most recent call last):" in error["output"]
    assert error["output"][-1] == "KeyError: 'DATABASE_URL'"
    status = _shipyard(server, "status", doc["id"])
    assert status.returncode == 0, status.stderr
    assert "KeyError: 'DATABASE_URL'" in status.stdout
    assert "exit code 1" in status.stdout


def test_logs_prints_the_app_output_and_follow_sees_new_lines(server: Server, repo: Path) -> None:
    _commit_app(repo, CHATTY_APP, "prints its requests")
    deployed = _shipyard(server, "deploy", str(repo), "--bake", "1", "--scale-down-delay", "1")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    url = server.service()["url"]
    assert httpx.get(f"{url}/first").status_code == 200

    def printed() -> str | None:
        out = _shipyard(server, "logs", "hello", "--tail", "20").stdout
        return out if "GET /first" in out else None

    # Each look starts a `shipyard logs` process: twice a second, not twenty times.
    out = wait_until(printed, 30, "GET /first in shipyard logs", interval=0.5)
    lines = out.splitlines()
    assert any(" err ready on " in line for line in lines), out
    assert any(line.endswith(" out GET /first") for line in lines), out

    follow = subprocess.Popen(
        _command(server, "logs", "hello", "--follow", "--tail", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    seen: queue.Queue[str] = queue.Queue()
    assert follow.stdout is not None
    stdout = follow.stdout

    def read() -> None:
        for line in stdout:
            seen.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        for marker in ("/while-following-1", "/while-following-2"):

            def arrived(marker: str = marker) -> bool:
                # Ask again until the stream shows it: the follower may not be connected yet.
                httpx.get(f"{url}{marker}")
                try:
                    line = seen.get(timeout=1)
                except queue.Empty:
                    return False
                return line.rstrip("\n").endswith(f" out GET {marker}")

            wait_until(arrived, 60, f"GET {marker} in shipyard logs --follow")
        assert follow.poll() is None  # still following
    finally:
        follow.terminate()
        follow.wait(10)
        stdout.close()
        if follow.stderr is not None:
            follow.stderr.close()
