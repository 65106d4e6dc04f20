"""The app the runtime contract suite runs on the real agent (copied into an artifact as
``app.py``; standard library only).

Every answer's body is ``<revision> <replica id>`` (from the agent's ``SHIPYARD_*`` variables), so
a test sees where the router sent each request. ``GET /status/<code>`` answers that status;
``GET /hold/<id>`` is held until ``GET /release/<id>`` (sent to this replica's own port) and
``GET /holding`` lists what is held; ``GET /exit/<code>`` ends the process with that exit code;
``GET /say/<stdout|stderr>/<text>`` prints the (%-decoded) text as one line on that stream.
At start it asks the harness (``$CONTRACT_STATE_URL``: the app runs sandboxed and shares no
files with the test, only the network) whether its revision is marked to crash; if so it exits 3
at once (a release that cannot start), so the agent's restarts keep failing. ``GET /health``
answers 200.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REVISION = os.environ["SHIPYARD_REVISION"]
REPLICA = os.environ["SHIPYARD_REPLICA"]
try:
    url = f"{os.environ['CONTRACT_STATE_URL']}/crash/{REVISION}"  # http://127.0.0.1:port
    with urllib.request.urlopen(url, timeout=5):  # noqa: S310 - the harness, plain http
        sys.exit(3)  # 200: marked
except urllib.error.HTTPError:
    pass  # 404: not marked

_HELD: dict[str, threading.Event] = {}
_LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        _, _, rest = self.path.partition("/")
        action, _, arg = rest.partition("/")
        if action == "exit":
            os._exit(int(arg))
        if action == "hold":
            with _LOCK:
                released = _HELD.setdefault(arg, threading.Event())
            released.wait(120)
            with _LOCK:
                _HELD.pop(arg, None)
        elif action == "release":
            with _LOCK:
                _HELD.setdefault(arg, threading.Event()).set()
        elif action == "say":
            stream, _, text = arg.partition("/")
            out = sys.stderr if stream == "stderr" else sys.stdout
            print(urllib.parse.unquote(text), file=out, flush=True)
        elif action == "holding":
            with _LOCK:
                held = sorted(k for k, e in _HELD.items() if not e.is_set())
            self._answer(200, json.dumps(held).encode())
            return
        status = int(arg) if action == "status" else 200
        self._answer(status, f"{REVISION} {REPLICA}".encode())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True


Server(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
