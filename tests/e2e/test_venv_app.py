"""A newcomer's Flask + gunicorn service the way the README shows it: a ``shell = true`` build
that makes a virtualenv and ``pip install``s into it (from PyPI), and ``[run] command`` a shell
line that execs the venv's ``gunicorn`` console script with ``$PORT``.

``shipyard serve`` (and its agent) is started from an environment that looks like Shipyard's own
install: its virtualenv first on ``PATH``, ``VIRTUAL_ENV`` set, ``SHIPYARD_*`` settings. The app
reports what it sees: its own venv (moved with the artifact from the build directory), none of
the server's environment, and the ``[run] env`` it asked for."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shipyard.cli.demo import _git
from tests.e2e.support import Server

SERVICE = "venvapp"
SERVER_VENV = "/opt/shipyard-server/.venv"
SECRET = "server-only-value-3b9f"

MANIFEST = """\
[service]
name = "venvapp"

[build]
shell = true
command = \"\"\"
python3 -m venv .venv &&
.venv/bin/pip install --disable-pip-version-check -q -r requirements.txt
\"\"\"

[run]
shell = true
command = "exec gunicorn -b 127.0.0.1:$PORT -w 1 --access-logfile - app:app"
env = { GREETING = "hello from [run] env" }

[health]
endpoint = "/health"
interval_seconds = 0.25
success_threshold = 2
"""

APP = """\
import os
import sys

from flask import Flask, jsonify

app = Flask(__name__)


@app.get("/health")
def health():
    return "ok"


@app.get("/")
def index():
    return jsonify(environ=dict(os.environ), prefix=sys.prefix, executable=sys.executable)
"""

# The notes example's pins: flask and gunicorn (a console script) and their dependencies.
NOTES = Path(__file__).parents[2] / "src" / "shipyard" / "examples" / "notes"
REQUIREMENTS = (NOTES / "requirements.txt").read_text()


@pytest.fixture
def venv_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "venv-repo"
    repo.mkdir()
    (repo / "shipyard.toml").write_text(MANIFEST)
    (repo / "app.py").write_text(APP)
    (repo / "requirements.txt").write_text(REQUIREMENTS)
    _git(repo, "init", "-q", "--initial-branch=main")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "a venv app")
    return repo


@pytest.fixture
def server_like_an_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("PATH", f"{SERVER_VENV}/bin:{os.environ['PATH']}")
    monkeypatch.setenv("VIRTUAL_ENV", SERVER_VENV)
    monkeypatch.setenv("SHIPYARD_E2E_SECRET", SECRET)
    s = Server(tmp_path / "data").start()  # inherits this environment, as from a shell
    try:
        yield s
    finally:
        s.stop()
        s.stop_agent()


def test_a_shell_build_venv_serves_with_its_console_script_in_a_clean_environment(
    server_like_an_install: Server, venv_repo: Path
) -> None:
    server = server_like_an_install
    commit = _git(venv_repo, "rev-parse", "HEAD")
    dep_id = server.deploy(venv_repo, commit, service=SERVICE)
    doc = server.wait_final(dep_id, timeout=240)
    assert doc["status"] == "Success", doc.get("error")
    assert server.client is not None
    log = server.client.get(f"/api/v1/deployments/{dep_id}/logs").json()["text"]
    assert "relocatable" in log and ".venv/bin/gunicorn" in log

    answer = httpx.get(doc["result"]["url"], timeout=10)
    assert answer.status_code == 200, answer.text
    seen = answer.json()
    environ: dict[str, str] = seen["environ"]

    # gunicorn came from the artifact's own venv, moved there from the build directory
    artifacts = (server.data_dir / "artifacts").resolve()
    venv = Path(environ["VIRTUAL_ENV"])
    assert venv.name == ".venv" and venv.parent.parent == artifacts
    assert seen["prefix"] == str(venv)
    assert environ["PATH"] == f"{venv}/bin:/usr/local/bin:/usr/bin:/bin"
    gunicorn = venv / "bin" / "gunicorn"
    assert gunicorn.read_text().startswith("#!/bin/sh\n")
    # ... and still runs from there, outside any sandbox, as any console script would
    version = subprocess.run(
        [str(gunicorn), "--version"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
    )
    assert version.returncode == 0 and "gunicorn" in version.stdout + version.stderr

    # nothing of the server's environment; what [run] env asked for
    assert SERVER_VENV not in repr(environ)
    assert SECRET not in repr(environ)
    assert {k for k in environ if k.startswith("SHIPYARD_")} == {
        "SHIPYARD_SERVICE",
        "SHIPYARD_REVISION",
        "SHIPYARD_REPLICA",
        "SHIPYARD_REGION",
    }
    assert environ["SHIPYARD_REGION"] == "local"
    assert environ["GREETING"] == "hello from [run] env"
    assert environ["HOME"] != os.environ.get("HOME")
    assert environ["TMPDIR"] == str(Path(environ["HOME"]).parent / "tmp")
