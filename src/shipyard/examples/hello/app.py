"""Shipyard's example service: answers with its version; ``/health`` for the health check.

Standard library only, so it runs from any artifact directory. Behaviour comes from files in the
repository, the way a real release changes behaviour: ``version.txt`` holds the version and an
optional ``unhealthy_after.txt`` makes ``/health`` fail that many seconds after start (the demo's
broken release).
"""

import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = (HERE / "version.txt").read_text().strip()
BROKEN = HERE / "unhealthy_after.txt"
UNHEALTHY_AFTER = float(BROKEN.read_text()) if BROKEN.exists() else None
STARTED = time.monotonic()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/health":
            sick = UNHEALTHY_AFTER is not None and time.monotonic() - STARTED > UNHEALTHY_AFTER
            self._answer(500 if sick else 200, b"unhealthy\n" if sick else b"ok\n")
        else:
            self._answer(200, f"hello from {VERSION}\n".encode())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


if __name__ == "__main__":
    Server(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
