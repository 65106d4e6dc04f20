"""A replica's environment is built by the supervisor, never inherited from the agent: not the
agent's PATH (it leads to Shipyard's own virtualenv), VIRTUAL_ENV or SHIPYARD_* settings; its
own HOME/TMPDIR, the artifact's virtualenv first on PATH, and the manifest's ``[run] env``.
A real ``replica_app.py`` under a real ``Supervisor`` reports ``os.environ`` over HTTP."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shipyard.agent.supervisor import DEFAULT_PATH, Supervisor
from tests.agent.helpers import REPLICA_APP, eventually, get_info, spec_for

SERVER_VENV = "/opt/shipyard-server/.venv"


def _artifact(root: Path, *, venv: bool) -> Path:
    d = root / ("artifact-venv" if venv else "artifact-plain")
    d.mkdir(parents=True)
    shutil.copy(REPLICA_APP, d / "app.py")
    (d / "helper.py").write_text("VALUE = 'v1'\n")
    if venv:  # what the supervisor looks for: a top-level directory with pyvenv.cfg and bin/
        (d / ".venv" / "bin").mkdir(parents=True)
        (d / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    for p in [*sorted(d.rglob("*"), reverse=True), d]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    return d


@pytest.mark.parametrize("venv", [False, True], ids=["no-venv", "artifact-venv"])
async def test_a_replica_sees_only_its_own_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, venv: bool
) -> None:
    monkeypatch.setenv("PATH", f"{SERVER_VENV}/bin:{os.environ['PATH']}")
    monkeypatch.setenv("VIRTUAL_ENV", SERVER_VENV)
    monkeypatch.setenv("SHIPYARD_TOKEN", "agent-secret-token")
    monkeypatch.setenv("SHIPYARD_DATA_DIR", str(tmp_path / "data"))
    artifact = _artifact(tmp_path, venv=venv)
    sup = Supervisor(tmp_path / "logs", lambda _: None, run_dir=tmp_path / "run", region="eu")
    try:
        spec = spec_for(artifact, service="envapp", env={"GREETING": "hello", "LANG": "C"})
        [replica] = await sup.start_revision(spec)
        info = await eventually(lambda: get_info(replica.port), what="the app answering")
    finally:
        await sup.stop_all(grace=2)
    environ: dict[str, str] = info["environ"]

    venv_bin = f"{artifact.resolve()}/.venv/bin"
    assert environ["PATH"] == (f"{venv_bin}:{DEFAULT_PATH}" if venv else DEFAULT_PATH)
    if venv:
        assert environ["VIRTUAL_ENV"] == str(artifact.resolve() / ".venv")
    else:
        assert "VIRTUAL_ENV" not in environ
    assert SERVER_VENV not in repr(environ)
    assert "agent-secret-token" not in repr(environ)
    assert {k for k in environ if k.startswith("SHIPYARD_")} == {
        "SHIPYARD_SERVICE",
        "SHIPYARD_REVISION",
        "SHIPYARD_REPLICA",
        "SHIPYARD_REGION",
    }
    assert environ["SHIPYARD_SERVICE"] == "envapp"
    assert environ["SHIPYARD_REGION"] == "eu"
    assert environ["GREETING"] == "hello"  # [run] env
    assert environ["LANG"] == "C"  # [run] env wins over the default
    assert environ["PORT"] == str(replica.port)
    assert environ["HOME"] == str(replica.run_dir / "home")
    assert environ["TMPDIR"] == str(replica.run_dir / "tmp")
    allowed = {
        "PATH", "VIRTUAL_ENV", "HOME", "TMPDIR", "XDG_CACHE_HOME", "PYTHONDONTWRITEBYTECODE",
        "LANG", "LC_ALL", "TZ", "PORT", "GREETING", "SHIPYARD_SERVICE", "SHIPYARD_REVISION",
        "SHIPYARD_REPLICA", "SHIPYARD_REGION",
    }  # fmt: skip
    # bubblewrap and the shell-less exec add nothing else; Python may set LC_CTYPE for C/POSIX.
    assert set(environ) - {"LC_CTYPE"} <= allowed, set(environ) - allowed
