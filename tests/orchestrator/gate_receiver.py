"""A real HTTP receiver for webhook-gate tests: a ``ThreadingHTTPServer`` on a free local port
that records every POST (path, headers, JSON body) and answers from a script.

``answers`` is consumed in order (an ``int`` status code, or ``"slow"``: hold the request until
the test ends, so the caller's timeout fires); once empty, ``default`` answers. A 3xx points
``location`` at ``/approved``, which (if followed) gets the next answer. Used by
tests/orchestrator/test_gates.py and test_freeze.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

Scripted = int | Literal["slow"]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Receiver:
    url: str
    answers: list[Scripted] = field(default_factory=list)
    default: Scripted = 200
    received: list[Received] = field(default_factory=list)
    released: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_answer(self) -> Scripted:
        with self.lock:
            return self.answers.pop(0) if self.answers else self.default


@contextmanager
def receiver() -> Iterator[Receiver]:
    """A receiver on 127.0.0.1 for the duration of the block."""
    state: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length)
            with state.lock:
                state.received.append(
                    Received(
                        self.path, {k.lower(): v for k, v in self.headers.items()}, json.loads(raw)
                    )
                )
            answer = state.next_answer()
            if answer == "slow":
                state.released.wait(30)
                answer = 200
            self.send_response(answer)
            if 300 <= answer < 400:  # somewhere that would say yes, if it were followed
                self.send_header("location", "/approved")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state = Receiver(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.released.set()
        server.shutdown()
        server.server_close()
        thread.join()
