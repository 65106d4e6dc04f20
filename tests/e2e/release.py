"""Helpers for ``tests/e2e/test_release_hooks.py``: what a release needs around the switch, seen
from outside a real ``shipyard serve``.

- ``HttpLog``: a small HTTP server in the test that remembers every request in order and can be
  taken down and brought back on the same port. Two of them stand in for what real releases
  talk to: the *database* a migration writes to (``MIGRATIONS``: the ``pre_deploy`` hook POSTs
  the schema version it applied, each replica GETs the list when it starts) and the *webhook
  receiver* of a notification sink.
- ``release_repo``: a git repository of a test-local service made from a bundled example (the
  Flask ``notes`` app, or stdlib ``hello``) with a manifest of our own: a ``pre_deploy``
  migration (``migrate.py``), an app wrapper (``release_app.py``) that reports what it saw when
  it started and the secrets it was given, ``[run] secrets``, ``[deploy] on_failure``.
- ``signed``: the receiver's side of a signed notification, checked here independently of
  ``shipyard.notify.verify`` (HMAC-SHA256 over ``"<timestamp>.<body>"``, Stripe-style).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from shipyard.cli.demo import _git, make_example_repo, make_notes_repo


@dataclass(frozen=True)
class Request:
    """One request an ``HttpLog`` answered."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float  # time.monotonic()

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class HttpLog:
    """An HTTP server on 127.0.0.1 that appends every request to ``requests`` and answers
    ``answer(request)`` -> (status, JSON body); ``down()`` closes its socket (connections are
    refused, like a receiver that is not running), ``up()`` listens on the same port again."""

    answer: Callable[[HttpLog, Request], tuple[int, Any]]
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> HttpLog:
        log = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                req = Request(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length) if length else b"",
                    time.monotonic(),
                )
                with log._lock:
                    log.requests.append(req)
                    status, doc = log.answer(log, req)
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: pytest shows our assertions instead

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = int(server.server_address[1])
        self._server = server
        threading.Thread(
            target=server.serve_forever, name=f"httplog-{self.port}", daemon=True
        ).start()
        return self

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.requests)


def migrations_db() -> HttpLog:
    """The "database" of the migration example: ``POST /attempts`` and ``POST /applied`` (a
    migration began / applied ``{"version", ...}``), ``GET /applied?...`` (the versions applied so
    far, in order: what a replica's ``release_app.py`` reads when it starts)."""

    def answer(log: HttpLog, req: Request) -> tuple[int, Any]:
        if req.method == "GET" and req.path.startswith("/applied"):
            applied = [
                r.json() for r in log.requests if r.method == "POST" and r.path == "/applied"
            ]
            return 200, [a["version"] for a in applied]
        return 201, {"ok": True}

    return HttpLog(answer).up()


def receiver() -> HttpLog:
    """A notification sink's webhook receiver: 200 to everything (verification is the test's)."""
    return HttpLog(lambda _log, _req: (200, {"ok": True})).up()


def signed(secret: str, req: Request, tolerance: float = 300) -> bool:
    """Whether ``req`` carries a valid ``X-Shipyard-Signature: v1=<hex>`` over
    ``"<X-Shipyard-Timestamp>.<body>"`` with ``secret``, its timestamp within ``tolerance``
    seconds of now (a receiver's replay protection)."""
    stamp = req.headers.get("x-shipyard-timestamp", "")
    given = req.headers.get("x-shipyard-signature", "")
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > tolerance:
        return False
    mac = hmac.new(secret.encode(), stamp.encode() + b"." + req.body, hashlib.sha256).hexdigest()
    return any(
        hmac.compare_digest(part.removeprefix("v1="), mac)
        for part in given.split(",")
        if part.strip().startswith("v1=")
    )


#: ``pre_deploy``'s migration: reads its version, tells the database it begins, fails if the
#: release says so (``migration_fails.txt``), else records what it applied and what it ran as.
MIGRATE_PY = '''\
"""The release's schema migration, run by Shipyard's pre_deploy hook before any replica starts."""
import json, os, sys, urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = (HERE / "version.txt").read_text().strip()


def post(path, doc):
    req = urllib.request.Request(
        os.environ["MIGRATIONS_URL"] + path, data=json.dumps(doc).encode(), method="POST",
        headers={"content-type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=10).close()


about = {
    "version": VERSION,
    "revision": os.environ.get("SHIPYARD_REVISION"),
    "service": os.environ.get("SHIPYARD_SERVICE"),
    "port": os.environ.get("PORT"),
    "uid": os.getuid(),
    "has_db_password": bool(os.environ.get("DB_PASSWORD")),
}
print(f"migrating the notes schema to {VERSION}", flush=True)
if os.environ.get("DB_PASSWORD"):  # careless, as real migrations are: the log must mask it
    print(f"connecting as notes with password {os.environ['DB_PASSWORD']}", flush=True)
post("/attempts", about)
if (HERE / "migration_fails.txt").exists():
    print(f"migration to {VERSION} failed: column notes.tags already exists", file=sys.stderr)
    sys.exit(3)
post("/applied", about)
print(f"schema at {VERSION}", flush=True)
'''

#: The notes app with two more routes: what the migrations database said when this process
#: started, and the secrets it was given (as Shipyard's docs say an app reads them).
RELEASE_APP_PY = '''\
"""The notes example behind two more routes for the release end-to-end test."""
import json, os, stat, urllib.parse, urllib.request
from pathlib import Path

from app import VERSION, app
from flask import jsonify

HERE = Path(__file__).resolve().parent


def _applied_at_start():
    url = os.environ.get("MIGRATIONS_URL")
    if not url:
        return None
    query = urllib.parse.urlencode(
        {
            "version": VERSION,
            "service": os.environ.get("SHIPYARD_SERVICE", ""),
            "replica": os.environ.get("SHIPYARD_REPLICA", ""),
        }
    )
    with urllib.request.urlopen(f"{url}/applied?{query}", timeout=10) as r:
        return json.load(r)


APPLIED_AT_START = _applied_at_start()


def migrations():
    return jsonify(
        version=VERSION,
        applied_at_start=APPLIED_AT_START,
        replica=os.environ.get("SHIPYARD_REPLICA"),
        uid=os.getuid(),
    )


def secrets():
    files = {}
    where = os.environ.get("SHIPYARD_SECRETS_DIR")
    if where:
        for path in sorted(Path(where).iterdir()):
            files[path.name] = {
                "value": path.read_text(),
                "mode": oct(stat.S_IMODE(path.stat().st_mode)),
                "owned": path.stat().st_uid == os.getuid(),
            }
    return jsonify(
        version=VERSION,
        db_password=os.environ.get("DB_PASSWORD"),
        files=files,
        secrets_dir=where,
        dir_mode=oct(stat.S_IMODE(Path(where).stat().st_mode)) if where else None,
    )


app.add_url_rule("/release/migrations", view_func=migrations, methods=["GET"])
app.add_url_rule("/release/secrets", view_func=secrets, methods=["GET"])
'''


def release_repo(
    path: Path,
    service: str,
    *,
    example: str = "notes",
    env: dict[str, str] | None = None,
    run_extra: str = "",
    sections: str = "",
) -> Path:
    """A git repository (branch main, one commit at v1) of ``example`` deployed as ``service``:
    its manifest renamed, ``[run] env`` plus ``env``, ``run_extra`` lines added to ``[run]``,
    ``sections`` (TOML tables) appended; the notes example runs ``release_app.py`` beside a
    ``migrate.py``."""
    repo = make_notes_repo(path) if example == "notes" else make_example_repo(path)
    manifest = (repo / "shipyard.toml").read_text()
    manifest = manifest.replace('name = "notes"', f'name = "{service}"').replace(
        'name = "hello"', f'name = "{service}"'
    )
    pairs = {"PYTHONPATH": ".deps", **(env or {})} if example == "notes" else dict(env or {})
    env_line = "env = { " + ", ".join(f'{k} = "{v}"' for k, v in pairs.items()) + " }"
    if example == "notes":
        (repo / "migrate.py").write_text(MIGRATE_PY)
        (repo / "release_app.py").write_text(RELEASE_APP_PY)
        manifest = manifest.replace("app:app", "release_app:app").replace(
            'env = { PYTHONPATH = ".deps" }', env_line + "\n" + run_extra
        )
    else:
        run = 'command = "python3 app.py"'
        extra = (env_line + "\n" if pairs else "") + run_extra
        manifest = manifest.replace(run, run + "\n" + extra)
    (repo / "shipyard.toml").write_text(manifest.rstrip() + "\n\n" + sections.strip() + "\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", f"deploy as {service}")
    return repo


def commit_file(repo: Path, name: str, text: str | None, message: str) -> str:
    """Write (``text``) or remove (None) one file of ``repo`` and commit; the new commit."""
    if text is None:
        (repo / name).unlink(missing_ok=True)
    else:
        (repo / name).write_text(text)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def files_holding(root: Path, needles: list[bytes]) -> list[str]:
    """Every regular file under ``root`` whose bytes contain one of ``needles`` (paths relative
    to ``root``); sockets, FIFOs and files that vanish while we look are skipped."""
    hits = []
    for path in sorted(root.rglob("*")):
        try:
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if any(n in data for n in needles):
            hits.append(str(path.relative_to(root)))
    return hits
