"""Shipyard's second example service: a small notes API on Flask, served by gunicorn.

Where ``examples/hello`` is the standard library only, this one is what services really look
like: dependencies installed from PyPI by the build's dependency step (``requirements.txt`` into
``.deps``), a WSGI framework behind a pre-fork server (``gunicorn.conf.py``), and state written
at start *into its working directory and $HOME*: Flask's ``instance/`` folder with a SQLite
database, a start record in ``~/.notes/``, Python's ``__pycache__`` and gunicorn's control socket
in ``~/.gunicorn/``. Shipyard has to run it from a verified artifact again and again (rollbacks)
regardless. ``shipyard.cli.demo.make_notes_repo`` makes a git repository of it; the end-to-end
suite ``tests/e2e/test_real_app.py`` deploys it.

Like hello, behaviour comes from files in the repository (``shipyard.cli.demo.commit_version``
writes them): ``version.txt`` is the version ``/`` answers with, ``unhealthy_after.txt`` makes
``/health`` fail that many seconds after start (a broken release), ``error_rate.txt`` (0..1) makes
that share of ``/`` requests answer 500 and ``delay_ms.txt`` makes each of them that slow;
``broken_region.txt`` names a region where this release is broken: a replica whose
``SHIPYARD_REGION`` (set by the agent) is that region answers 500 to every request, ``/health``
included (the fleet tests' release that is bad in one region only).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

# flask is this app's dependency (requirements.txt, installed into .deps by the build), not
# Shipyard's: Shipyard's type check runs without it.
from flask import Flask, Response, abort, jsonify, request  # type: ignore[import-not-found]

HERE = Path(__file__).resolve().parent


def _setting(name: str) -> float | None:
    path = HERE / name
    return float(path.read_text()) if path.exists() else None


VERSION = (HERE / "version.txt").read_text().strip()
UNHEALTHY_AFTER = _setting("unhealthy_after.txt")
ERROR_RATE = _setting("error_rate.txt") or 0.0
DELAY_S = (_setting("delay_ms.txt") or 0.0) / 1000
_BROKEN_REGION = HERE / "broken_region.txt"
BROKEN_HERE = _BROKEN_REGION.exists() and _BROKEN_REGION.read_text().strip() == os.environ.get(
    "SHIPYARD_REGION"
)
STARTED = time.monotonic()
_COUNTER = itertools.count()
_LOCK = threading.Lock()


def _fails() -> bool:
    """Deterministic: exactly ERROR_RATE of requests, spread evenly."""
    if ERROR_RATE <= 0:
        return False
    with _LOCK:
        n = next(_COUNTER)
    return int((n + 1) * ERROR_RATE) > int(n * ERROR_RATE)


@contextlib.contextmanager
def _connect(database: Path) -> Iterator[sqlite3.Connection]:
    """One connection per use, committed on success and always closed."""
    db = sqlite3.connect(database, timeout=5)
    db.row_factory = sqlite3.Row
    try:
        with db:
            yield db
    finally:
        db.close()


def create_app() -> Flask:
    app = Flask(__name__, instance_relative_config=True)
    # What a Flask app with a database does at start: make the instance folder (next to this
    # module: in the working directory) and create its tables.
    os.makedirs(app.instance_path, exist_ok=True)
    database = Path(app.instance_path) / "notes.sqlite3"
    with _connect(database) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL,"
            " version TEXT NOT NULL, created REAL NOT NULL)"
        )
    # ... and what many do in $HOME: leave a record of the last start.
    home = Path.home() / ".notes"
    home.mkdir(exist_ok=True)
    (home / f"started-{os.getpid()}.json").write_text(
        json.dumps({"version": VERSION, "pid": os.getpid(), "at": time.time()})
    )

    def broken_here() -> Response | None:
        if BROKEN_HERE:
            return Response(f"notes {VERSION} is broken in this region\n", status=500)
        return None

    app.before_request(broken_here)

    def index() -> Response:
        if DELAY_S:
            time.sleep(DELAY_S)
        if _fails():
            return Response(f"notes {VERSION} failed\n", status=500, mimetype="text/plain")
        return Response(f"notes {VERSION}\n", mimetype="text/plain")

    def health() -> Response:
        sick = UNHEALTHY_AFTER is not None and time.monotonic() - STARTED > UNHEALTHY_AFTER
        with _connect(database) as db:
            db.execute("SELECT 1")
        if sick:
            return Response("unhealthy\n", status=500, mimetype="text/plain")
        return Response("ok\n", mimetype="text/plain")

    def list_notes() -> Response:
        with _connect(database) as db:
            rows = db.execute("SELECT id, text, version FROM notes ORDER BY id").fetchall()
        return jsonify([dict(r) for r in rows])

    def add_note() -> tuple[Response, int]:
        text = (request.get_json(silent=True) or {}).get("text")
        if not isinstance(text, str) or not text.strip():
            abort(400, "a note needs a non-empty 'text'")
        with _connect(database) as db:
            cur = db.execute(
                "INSERT INTO notes (text, version, created) VALUES (?, ?, ?)",
                (text, VERSION, time.time()),
            )
        return jsonify({"id": cur.lastrowid, "text": text, "version": VERSION}), 201

    # add_url_rule rather than @app.get: the same routes, without decorators that are untyped
    # where flask is not installed.
    app.add_url_rule("/", view_func=index, methods=["GET"])
    app.add_url_rule("/health", view_func=health, methods=["GET"])
    app.add_url_rule("/notes", view_func=list_notes, methods=["GET"])
    app.add_url_rule("/notes", view_func=add_note, methods=["POST"])
    return app


app = create_app()
