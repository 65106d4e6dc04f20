"""Shipyard's example service: answers with its version; ``/health`` for the health check.

Standard library only, so it runs from any artifact directory. Behaviour comes from files in the
repository, the way a real release changes behaviour: ``version.txt`` holds the version, an
optional ``unhealthy_after.txt`` makes ``/health`` fail that many seconds after start (the demo's
broken release), ``error_rate.txt`` (0..1) makes that share of other requests answer 500, and
``delay_ms.txt`` makes every other request take that long (the canary tests' bad releases; the
health check stays fast and green, so only the router's metrics can tell). ``broken_region.txt``
names a region where this release is broken: a replica whose ``SHIPYARD_REGION`` (set by the
agent) is that region answers 500 to everything, ``/health`` included (the fleet tests' and
``shipyard demo --fleet``'s release that is bad in one region only).
"""

import itertools
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = (HERE / "version.txt").read_text().strip()
BROKEN = HERE / "unhealthy_after.txt"
UNHEALTHY_AFTER = float(BROKEN.read_text()) if BROKEN.exists() else None
STARTED = time.monotonic()


def _number(name: str) -> float:
    path = HERE / name
    return float(path.read_text()) if path.exists() else 0.0


ERROR_RATE = _number("error_rate.txt")
_BROKEN_REGION = HERE / "broken_region.txt"
BROKEN_HERE = _BROKEN_REGION.exists() and _BROKEN_REGION.read_text().strip() == os.environ.get(
    "SHIPYARD_REGION"
)
DELAY_S = _number("delay_ms.txt") / 1000
_COUNTER = itertools.count()
_LOCK = threading.Lock()


def _fails() -> bool:
    """Deterministic: exactly ERROR_RATE of requests, spread evenly."""
    if ERROR_RATE <= 0:
        return False
    with _LOCK:
        n = next(_COUNTER)
    return int((n + 1) * ERROR_RATE) > int(n * ERROR_RATE)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if BROKEN_HERE:
            self._answer(500, f"{VERSION} is broken in this region\n".encode())
        elif self.path == "/health":
            sick = UNHEALTHY_AFTER is not None and time.monotonic() - STARTED > UNHEALTHY_AFTER
            self._answer(500 if sick else 200, b"unhealthy\n" if sick else b"ok\n")
        else:
            if DELAY_S:
                time.sleep(DELAY_S)
            if _fails():
                self._answer(500, f"{VERSION} failed\n".encode())
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
