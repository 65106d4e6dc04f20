"""``shipyard status DEPLOYMENT --watch`` end to end: the real CLI watching a canary run by
``shipyard serve`` and its agent under wrk load, through its analysis and its gate, promoted by
``shipyard promote`` (which prints only what happens after it), to the end.

Two watchers follow the same deployment: one on a pseudo-terminal (the live, redrawn tree) and
one on a pipe (plain lines, each change once).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

from shipyard.cli.demo import commit_version
from shipyard.cli.token import issue_local
from tests.e2e.support import ALL, Server, Wrk, wait_until
from tests.e2e.test_canary import FAST, canary, deploy, first


class Output:
    """What a child process writes to ``fd``, collected by a thread until it closes."""

    def __init__(self, fd: int) -> None:
        self.fd, self.chunks = fd, bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # a pty's master reads EIO once the child side is closed
                return
            if not data:
                return
            self.chunks += data

    @property
    def text(self) -> str:
        return self.chunks.decode("utf-8", errors="replace")


def shipyard(server: Server, *args: str, **popen: object) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SHIPYARD_TOKEN": issue_local(server.data_dir, "watcher", ALL)}
    env.pop("COLUMNS", None)
    env["TERM"] = "xterm-256color"
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "shipyard.cli.main", *args, "--server", server.base],
        env=env,
        **popen,
    )


def test_watch_follows_a_canary_through_its_gate_to_promotion(server: Server, repo: Path) -> None:
    url = first(server, repo)
    v2 = commit_version(repo, "v2")
    before = server.router_requests()
    load = Wrk(url, seconds=300, connections=8)  # stopped once the deployment ended
    server.wait_for_traffic(before)
    dep = deploy(
        server,
        repo,
        v2,
        canary(
            {"weight": 20, "duration_seconds": 3, "analysis": FAST, "pause": True},
            {"weight": 50, "duration_seconds": 3, "analysis": FAST},
        ),
    )
    watch = ["status", dep, "--watch", "--interval", "0.3"]
    piped = shipyard(server, *watch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert piped.stdout is not None
    plain = Output(piped.stdout.fileno())
    master, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 220, 0, 0))
    live = shipyard(server, *watch, stdin=child, stdout=child, stderr=child)
    os.close(child)
    tty = Output(master)
    try:
        paused = f"next: paused (stage 1 gate): run `shipyard promote {dep}` to go on"
        wait_until(lambda: paused in plain.text, 90, "the plain watcher to show the gate")
        wait_until(lambda: "shipyard promote" in tty.text, 30, "the live view to show the gate")
        assert piped.poll() is None and live.poll() is None  # a pause is not an end
        promote = shipyard(server, "promote", dep, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        promoted_out, promoted_err = promote.communicate(timeout=120)
        assert piped.wait(timeout=60) == 0, plain.text
        assert live.wait(timeout=60) == 0, tty.text
    finally:
        for proc in (piped, live, load.proc):
            if proc.poll() is None:
                proc.terminate()
                proc.communicate(timeout=30)
        plain.thread.join(timeout=10)
        tty.thread.join(timeout=10)
        piped.stdout.close()
        os.close(master)

    doc = server.deployment(dep)
    assert doc["status"] == "Success", doc.get("error")
    lines = plain.text.splitlines()
    assert lines[-1] == f"next: done: `shipyard rollback {dep}` puts {doc['blue_revision']} back"
    for name in ("analysis_1", "analysis_2"):
        measured = next(s for s in doc["stages"] if s["name"] == name)["detail"]["measurements"]
        shown = [ln for ln in lines if ln.startswith(f"  {name} #")]
        assert len(shown) == len(measured) > 0  # every verdict, as it happened, once
        assert all("(need 20)" in ln and "success" in ln for ln in shown if "pass" in ln)
    assert "stage gate_1 running" in lines
    assert any(ln.startswith("stage gate_1 succeeded ") and "promoted by" in ln for ln in lines)
    assert any(ln.startswith("stage promote succeeded ") for ln in lines)
    assert "\x1b" not in plain.text

    # The live view redrew the tree in place (cursor movement) and left the final one on screen.
    assert "\x1b[" in tty.text
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", tty.text)  # styles and cursor moves dropped
    assert "Canary  Success" in screen and "✔ promote" in screen
    assert screen.count("Canary  Paused") >= 1 and "◷ gate_1" in screen

    # promote printed what came after it, not the build log or the stages before the gate.
    assert promote.returncode == 0, promoted_err
    err = promoted_err.decode()
    assert "build |" not in err
    followed = [
        ln.split()[1] for ln in err.splitlines() if ln.startswith("  ") and "status" not in ln
    ]
    assert "build" not in followed and "analysis_1" not in followed
    assert {"canary_2", "analysis_2", "promote"} <= set(followed)
    assert "Success" in err
    assert promoted_out == b""
