"""Artifacts stay immutable at run time (agent/supervisor.py, agent/launch.py): a replica's
writable state lives in its run directory, and on the copy-on-write overlay an app may write into
its working directory while the artifact's digest never changes. Real processes of
``replica_app.py`` under a real ``Supervisor``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shipyard.agent import replica_logs
from shipyard.agent.supervisor import Replica, Supervisor
from shipyard.build.digest import digest_tree
from shipyard.errors import RevisionStartFailed
from shipyard.runtime.base import LogQuery, RevisionSpec
from shipyard.sandbox import launch
from tests.agent.helpers import NOT_ROOT, eventually, get_info, make_artifact, spec_for

root_only = pytest.mark.skipif(NOT_ROOT, reason="the overlay needs root (CAP_SYS_ADMIN)")


@pytest.fixture
async def supervisor(tmp_path: Path) -> AsyncIterator[Supervisor]:
    sup = Supervisor(tmp_path / "logs", lambda _: None, run_dir=tmp_path / "run")
    try:
        yield sup
    finally:
        await sup.stop_all(grace=2)


async def _running(sup: Supervisor, replica_id: str, restarts: int) -> Replica | None:
    r = sup.replicas.get(replica_id)
    return r if r is not None and r.restarts == restarts and r.state == "running" else None


@root_only
async def test_the_artifact_never_changes_and_every_start_sees_a_fresh_view(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    artifact = make_artifact(tmp_path, "v1")
    digest = digest_tree(artifact)
    assert await supervisor.mode() == "overlay"
    # The second start lets Python write bytecode: only the overlay keeps it out of the artifact.
    for env in ({}, {"PYTHONDONTWRITEBYTECODE": ""}):
        await _start_restart_stop(supervisor, spec_for(artifact, env=env), artifact)
        assert digest_tree(artifact) == digest


async def _start_restart_stop(sup: Supervisor, spec: RevisionSpec, artifact: Path) -> None:
    [replica] = await sup.start_revision(spec)
    info = await eventually(lambda: get_info(replica.port), what="the app answering")
    assert info["fresh_cwd"] and info["fresh_home"]
    assert info["cwd"] == str(artifact.resolve())  # the app still runs "in" its artifact
    run = replica.run_dir
    assert info["env"]["HOME"] == str(run / "home")
    assert info["env"]["TMPDIR"] == str(run / "tmp")
    assert info["env"]["XDG_CACHE_HOME"] == str(run / "home" / ".cache")
    assert info["env"]["PYTHONDONTWRITEBYTECODE"] == spec.env.get("PYTHONDONTWRITEBYTECODE", "1")
    assert Path(info["tmpfile"]).parent == run / "tmp"
    # Writes landed in the replica's own layer, not in the artifact.
    assert (run / "upper" / "written.txt").exists()
    assert (run / "home" / "state.txt").exists()
    assert (run / "upper" / "__pycache__").exists() == bool(spec.env)
    assert not (artifact / "written.txt").exists()

    # A restart is a start too: a fresh view again, the replica's id kept.
    assert replica.process is not None
    os.kill(replica.process.pid, signal.SIGKILL)
    await eventually(lambda: _running(sup, replica.replica_id, 1), what="the restart")
    again = await eventually(lambda: get_info(replica.port), what="the restarted app")
    assert again["instance"] != info["instance"]
    assert again["fresh_cwd"] and again["fresh_home"]

    await sup.stop(replica, grace=2)
    assert not run.exists()


async def test_direct_mode_keeps_state_out_of_the_artifact_too(tmp_path: Path) -> None:
    """Without the overlay (not root, or forced), HOME and TMPDIR still live in the run
    directory and no bytecode is written beside the artifact's modules."""
    sup = Supervisor(
        tmp_path / "logs", lambda _: None, run_dir=tmp_path / "run", isolation="direct"
    )
    artifact = make_artifact(tmp_path, "v1")
    try:
        [replica] = await sup.start_revision(spec_for(artifact))
        info = await eventually(lambda: get_info(replica.port), what="the app answering")
        assert info["cwd"] == str(artifact.resolve())
        assert info["env"]["HOME"] == str(replica.run_dir / "home")
        assert info["env"]["TMPDIR"] == str(replica.run_dir / "tmp")
        assert not (artifact / "__pycache__").exists()
        assert not (replica.run_dir / "upper").exists()
    finally:
        await sup.stop_all(grace=2)
    assert not replica.run_dir.exists()


async def test_a_command_that_is_not_there_is_refused_before_anything_starts(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    artifact = make_artifact(tmp_path, "v1")
    for argv, says in (
        (["no-such-command-here"], "not found on PATH"),
        (["./app.py"], "is not an executable file"),  # present, but mode 0444
    ):
        with pytest.raises(RevisionStartFailed, match=says):
            await supervisor.start_revision(spec_for(artifact, argv=argv))
    assert supervisor.replicas == {}
    assert list((tmp_path / "run").iterdir()) == []


@root_only
async def test_a_launch_failure_says_why_in_the_replica_log(
    supervisor: Supervisor, tmp_path: Path
) -> None:
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    script = artifact / "run.sh"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    [replica] = await supervisor.start_revision(spec_for(artifact, argv=["./run.sh"]))

    async def crashed() -> bool:
        return replica.state == "crashed"

    await eventually(crashed, what="the launch failure")
    assert replica.exit_code == launch.EXIT_NOT_EXECUTABLE
    logs = replica.log_path.parent
    batch = replica_logs.read(logs, LogQuery(replica_id=replica.replica_id))
    assert (batch.lines[0].stream, batch.lines[0].text) == (
        "stderr",
        "shipyard launch: cannot execute './run.sh': the interpreter on its '#!' line was not "
        "found",
    )


def _launch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", "-S", launch.__file__, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@root_only
def test_the_launcher_exits_with_one_line_saying_why(tmp_path: Path) -> None:
    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    paths = ["--overlay", str(lower), str(upper), str(work)]
    gone = ["--overlay", str(tmp_path / "gone"), str(upper), str(work)]
    cases = [
        ([*paths, "--", "no-such-command"], 127, "command 'no-such-command' not found on PATH"),
        ([*gone, "--", "true"], 125, f"cannot mount overlay on {tmp_path / 'gone'}"),
        (paths, 125, "no command after '--'"),
        (["--overlay", "relative", *paths[2:], "--", "true"], 125, "must be an absolute path"),
        (["--user", "0:0", "--", "true"], 125, "neither of them 0"),
    ]
    for args, code, says in cases:
        done = _launch(*args)
        assert done.returncode == code, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("shipyard launch: ")
        assert says in done.stderr
    done = _launch(*paths, "--", "sh", "-c", "echo changed > f && cat f && pwd")
    assert (done.returncode, done.stdout) == (0, f"changed\n{lower}\n")
    assert list(lower.iterdir()) == []
    assert (upper / "f").read_text() == "changed\n"


_OVERLAY = ["--overlay", "/a", "/u", "/w"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        pytest.param(["--overlay", "/a,b", "/u", "/w", "--", "x"], "must not hold ','", id="comma"),
        pytest.param(["--overlay", "/a:b", "/u", "/w", "--", "x"], "must not hold ','", id="colon"),
        pytest.param(_OVERLAY, "no command after '--'", id="no-command"),
        pytest.param(["--check"], "--check needs --overlay", id="check-no-overlay"),
        pytest.param(["--hide", "rel", "--", "x"], "must be an absolute path", id="relative"),
        pytest.param(["--user", "x:1", "--", "x"], "must be UID:GID", id="bad-user"),
        pytest.param(["--bogus"], "unexpected argument '--bogus'", id="unknown-flag"),
    ],
)
def test_launcher_arguments_are_refused_before_any_mount(args: list[str], says: str) -> None:
    with pytest.raises(launch.LaunchError, match=says):
        launch.parse(args)


def test_launcher_arguments_parse() -> None:
    opts = launch.parse(
        [*_OVERLAY, "--hide", "/d", "--bind", "/b", "--expose", "/e", "--user", "7000:7001",
         "--bwrap", "/usr/bin/bwrap", "--chdir", "/a", "--", "python3", "--", "-x"]
    )  # fmt: skip
    assert (opts.overlay, opts.hide, opts.bind, opts.expose) == (
        ("/a", "/u", "/w"),
        ["/d"],
        ["/b"],
        ["/e"],
    )
    assert (opts.user, opts.bwrap, opts.chdir, opts.check) == (
        (7000, 7001),
        "/usr/bin/bwrap",
        "/a",
        False,
    )
    assert opts.argv == ["python3", "--", "-x"]


async def test_paths_the_overlay_options_cannot_carry_fall_back_to_direct(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    odd = Supervisor(tmp_path / "logs", lambda _: None, run_dir=tmp_path / "run,1")
    assert await odd.mode() == "direct"
    sup = Supervisor(tmp_path / "logs", lambda _: None, run_dir=tmp_path / "run")
    artifact = make_artifact(tmp_path / "odd:dir", "v1")
    try:
        [replica] = await sup.start_revision(spec_for(artifact))
        info = await eventually(lambda: get_info(replica.port), what="the app answering")
        assert info["cwd"] == str(artifact.resolve())
        if await sup.mode() == "overlay":
            assert "overlay options cannot carry" in caplog.text
            assert not (replica.run_dir / "upper").exists()
    finally:
        await sup.stop_all(grace=2)
