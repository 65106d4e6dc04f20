"""The app the agent's tests run as replicas (copied into an artifact as ``app.py``; stdlib only).

At start it imports ``helper`` (a ``.py`` module beside it, so Python would write bytecode next to
it), writes ``written.txt`` into its working directory and ``state.txt`` under ``$HOME`` and a
file under ``$TMPDIR``, noting whether each was already there. ``GET /info`` answers what it saw
as JSON; ``GET /`` answers ``<helper.VALUE> <instance>`` (a random id per process start: in a
sandbox every app is pid 2 of its own PID namespace, so a pid cannot tell two starts apart);
``GET /health`` answers 200, or 500 when
``SICK_AFTER_FIRST=1`` and the test's start counter (``START_URL``, ``helpers.StartCounter``: a
sandboxed app shares no files with the test) counted an earlier start. With
``SPAWN_CHILD=<file>`` it starts a child in its own process group (as gunicorn does with its
workers) and writes the child's pid to that file. ``/info`` also says its uid and, with
``SHIPYARD_SECRETS_DIR``, each secret file's mode, owner and text; ``PRINT_VAR=NAME`` prints
that variable's value at start.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

helper = importlib.import_module("helper")
INSTANCE = f"{os.getpid()}-{os.urandom(4).hex()}"

_cwd_file = Path("written.txt")
_home_file = Path(os.environ["HOME"]) / "state.txt"
SEEN: dict[str, object] = {
    "fresh_cwd": not _cwd_file.exists(),
    "fresh_home": not _home_file.exists(),
    "cwd": os.getcwd(),
    "pid": os.getpid(),
    "instance": INSTANCE,
    "env": {
        k: os.environ.get(k)
        for k in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "PYTHONDONTWRITEBYTECODE", "PORT")
    },
    "environ": dict(os.environ),
}
SEEN["uid"] = os.getuid()
if os.environ.get("SHIPYARD_SECRETS_DIR"):  # app secrets as files: what the app finds there
    _secrets = Path(os.environ["SHIPYARD_SECRETS_DIR"])
    SEEN["secrets_dir"] = {"mode": _secrets.stat().st_mode & 0o7777, "uid": _secrets.stat().st_uid}
    SEEN["secret_files"] = {
        f.name: {"mode": f.stat().st_mode & 0o7777, "uid": f.stat().st_uid, "text": f.read_text()}
        for f in sorted(_secrets.iterdir())
    }
if os.environ.get("PRINT_VAR"):  # prints that variable's value (a secret, for log masking)
    print(f"my value is {os.environ[os.environ['PRINT_VAR']]}", flush=True)
_cwd_file.write_text(f"written by {os.getpid()}\n")
_home_file.write_text(f"written by {os.getpid()}\n")
with tempfile.NamedTemporaryFile(delete=False) as tmp:
    SEEN["tmpfile"] = tmp.name

_starts = 0
if os.environ.get("START_URL"):
    with urllib.request.urlopen(os.environ["START_URL"], timeout=5) as answer:  # noqa: S310
        _starts = int(answer.read())
SICK = os.environ.get("SICK_AFTER_FIRST") == "1" and _starts > 1

if os.environ.get("SPAWN_CHILD"):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(os.environ["SPAWN_CHILD"]).write_text(str(child.pid))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/info":
            self._answer(200, json.dumps(SEEN).encode())
        elif self.path == "/health":
            self._answer(500 if SICK else 200, b"sick\n" if SICK else b"ok\n")
        else:
            self._answer(200, f"{helper.VALUE} {INSTANCE}\n".encode())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
