"""The hostile repository's app: probes at start (``probe.py``) and serves ``GET /report``
(``{"build": ..., "run": ...}``) and ``GET /health``."""

from __future__ import annotations

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import probe  # type: ignore[import-not-found]  # beside this file in the artifact

REPORT = json.dumps(
    {"build": json.loads(Path("build-report.json").read_text()), "run": probe.probe()}
).encode()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = REPORT if self.path == "/report" else b"ok\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
