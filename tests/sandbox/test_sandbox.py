"""The workload sandbox (shipyard.sandbox): what a build command or an app replica can and cannot
reach, run for real through launch.py and bubblewrap."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from shipyard.errors import InvalidInput
from shipyard.sandbox import Sandbox, SandboxPolicy, SandboxUnavailable, UidRange
from shipyard.sandbox.uids import UidAllocator, UidRangeExhausted

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="per-service uids need root")

#: Runs inside the sandbox: reports what it can see and do as JSON on stdout.
PROBE = r"""
import json, os, sys
data, secret_env = sys.argv[1], sys.argv[2]
def attempt(fn):
    try:
        return "LEAKED: " + repr(fn())[:60]
    except OSError as exc:
        return "blocked: " + type(exc).__name__
lines = open("/proc/self/status").read().splitlines()
status = dict(l.split(":\t", 1) for l in lines if ":\t" in l)
others = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            if secret_env.encode() in open(f"/proc/{pid}/environ", "rb").read():
                others.append(pid)
        except OSError:
            pass
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "cap_eff": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip(),
    "pid": os.getpid(), "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "read_key": attempt(lambda: open(os.path.join(data, "keys", "jwt.key"), "rb").read()),
    "list_keys": attempt(lambda: os.listdir(os.path.join(data, "keys"))),
    "write_db": attempt(lambda: open(os.path.join(data, "shipyard.db"), "ab").write(b"x")),
    "write_etc": attempt(lambda: open("/etc/shipyard-escape", "w").write("x")),
    "tmp": os.listdir("/tmp"),
    "env_secret_seen_in_proc": others,
    "env": sorted(os.environ),
    "write_work": attempt(lambda: open("out.txt", "w").write("ok")),
}))
"""


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    (d / "keys").mkdir(parents=True)
    (d / "keys" / "jwt.key").write_bytes(os.urandom(32))
    (d / "shipyard.db").write_bytes(b"SQLite format 3\0")
    d.chmod(0o700)
    return d


def _run(sandbox: Sandbox, work: Path, data_dir: Path, service: str = "web") -> dict[str, Any]:
    (work / "probe.py").write_text(PROBE)
    sandbox.hand_over(service, work)
    cmd = sandbox.command(
        [sys.executable, "probe.py", str(data_dir), "SANDBOX_TEST_SECRET=hunter2"],
        service=service,
        cwd=work,
        writable=[work],
    )
    done = subprocess.run(
        cmd,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": os.environ["PATH"], "SANDBOX_VISIBLE": "1"},
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@root_only
def test_a_sandboxed_workload_sees_nothing_of_the_server(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server's own environment holds a secret; its /proc must be out of reach.
    monkeypatch.setenv("SANDBOX_TEST_SECRET", "hunter2")
    sandbox = Sandbox(SandboxPolicy(data_dir))
    work = data_dir / "builds" / "b-1" / "src"  # inside the data directory, like a real build
    work.mkdir(parents=True)
    report = _run(sandbox, work, data_dir)

    identity = sandbox.identity("web")
    assert identity is not None and identity.uid in UidRange.default()
    assert (report["uid"], report["gid"], report["groups"]) == (identity.uid, identity.uid, [])
    assert report["cap_eff"] == "0000000000000000"
    assert report["no_new_privs"] == "1"
    # Its own PID namespace: only the sandbox's processes, none of the server's.
    assert report["pid"] < 10 and max(report["pids"]) < 10
    assert report["env_secret_seen_in_proc"] == []
    assert str(report["read_key"]).startswith("blocked: ")
    assert str(report["list_keys"]).startswith("blocked: ")
    assert str(report["write_db"]).startswith("blocked: ")
    assert str(report["write_etc"]).startswith("blocked: ")
    # What it was given, plus what Python (PEP 538's LC_CTYPE) and bubblewrap (PWD) add.
    assert set(report["env"]) - {"LC_CTYPE", "PWD"} == {"PATH", "SANDBOX_VISIBLE"}
    assert report["write_work"].startswith("LEAKED")  # it may write here
    assert (work / "out.txt").read_text() == "ok"
    # The host is untouched.
    assert (data_dir / "shipyard.db").read_bytes() == b"SQLite format 3\0"
    assert not Path("/etc/shipyard-escape").exists()


@root_only
def test_each_service_gets_its_own_uid_for_good(data_dir: Path, tmp_path: Path) -> None:
    sandbox = Sandbox(SandboxPolicy(data_dir, uid_range=UidRange(300000, 300001)))
    web, api = sandbox.identity("web"), sandbox.identity("api")
    assert web is not None and api is not None and web.uid != api.uid
    again = Sandbox(SandboxPolicy(data_dir, uid_range=UidRange(300000, 300001)))
    assert again.identity("web") == web  # persistent across processes (the file in data_dir)
    assert oct((data_dir / "sandbox-uids.json").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(UidRangeExhausted, match="widen --sandbox-uids"):
        again.identity("third")


def test_uid_ranges_are_validated() -> None:
    assert UidRange.parse("200000-299999") == UidRange(200000, 299999)
    for bad in ("0-10", "5-3", "abc", "1000", "100-2000"):
        with pytest.raises(InvalidInput):
            UidRange.parse(bad)


def test_the_allocator_never_hands_out_a_uid_twice(tmp_path: Path) -> None:
    alloc = UidAllocator(tmp_path / "uids.json", UidRange(5000, 5009))
    uids = [alloc.uid_for(f"s{i}") for i in range(10)]
    assert sorted(uids) == list(range(5000, 5010))
    assert [alloc.uid_for(f"s{i}") for i in range(10)] == uids


def test_without_bubblewrap_the_server_refuses_to_run_workloads(tmp_path: Path) -> None:
    sandbox = Sandbox(SandboxPolicy(tmp_path, bwrap="/nonexistent/bwrap"))
    with pytest.raises(
        SandboxUnavailable, match=r"apt-get install bubblewrap.*--insecure-no-sandbox"
    ):
        sandbox.check()


def test_insecure_mode_runs_the_command_as_given(tmp_path: Path) -> None:
    sandbox = Sandbox(SandboxPolicy(tmp_path, insecure=True))
    sandbox.check()  # nothing to check
    assert sandbox.command(["app", "--x"], service="s", cwd=tmp_path, writable=[]) == ["app", "--x"]
    assert sandbox.identity("s") is None
    assert "INSECURE" in sandbox.describe()


@root_only
def test_the_check_passes_here(tmp_path: Path) -> None:
    Sandbox(SandboxPolicy(tmp_path / "data")).check()


def test_path_entries_the_sandbox_cannot_see_are_dropped(tmp_path: Path) -> None:
    home = Path.home()
    exposed = tmp_path / "visible"
    sandbox = Sandbox(SandboxPolicy(tmp_path / "data", hide=(tmp_path,), expose=(exposed,)))
    path = os.pathsep.join([str(home / "bin"), "/usr/bin", str(tmp_path / "tools"), str(exposed)])
    kept = sandbox.visible_path(path).split(os.pathsep)
    assert "/usr/bin" in kept and str(exposed) in kept
    assert str(tmp_path / "tools") not in kept
    if home != Path("/"):
        assert str(home / "bin") not in kept
    insecure = Sandbox(SandboxPolicy(tmp_path / "data", insecure=True))
    assert insecure.visible_path(path) == path


def test_a_python_installed_under_tmp_stays_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkout under /tmp (CI's fresh clone) has its venv there: /tmp is private inside the
    sandbox, so the venv is mounted back read-only, and its bin stays on the workload's PATH."""
    venv = Path("/tmp") / "some-checkout" / ".venv"
    monkeypatch.setattr(sys, "prefix", str(venv))
    sandbox = Sandbox(SandboxPolicy(tmp_path / "data"))
    assert str(venv) in sandbox.exposed()
    assert sandbox.visible_path(f"{venv}/bin:/usr/bin") == f"{venv}/bin:/usr/bin"
    assert sandbox.visible_path("/tmp/elsewhere/bin:/usr/bin") == "/usr/bin"


@root_only
def test_the_shared_directory_is_hidden_like_the_data_directory(
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """``serve --shared-dir``: the replicas' keys are hidden from workloads (an empty view:
    not found), not merely unreadable (a permission error), as without the flag."""
    from shipyard.cli.common import make_sandbox
    from shipyard.settings import Settings

    # Outside /tmp, which every workload sees as its own empty one anyway.
    shared = Path(tempfile.mkdtemp(prefix="shipyard-shared-", dir="/var/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(shared))
    (shared / "keys").mkdir()
    (shared / "keys" / "jwt.key").write_bytes(os.urandom(32))
    monkeypatch.setenv("SHIPYARD_SANDBOX_UIDS", "")  # make_sandbox passes its choice on
    for n, sandbox in enumerate(
        (
            make_sandbox(data_dir, False, "200000-299999", shared),
            Sandbox(Settings(data_dir=data_dir, shared_dir=shared).sandbox_policy),
        )
    ):
        work = tmp_path / f"work-{n}"
        work.mkdir()
        report = _run(sandbox, work, shared)
        assert report["list_keys"] == "blocked: FileNotFoundError"
        assert report["read_key"] == "blocked: FileNotFoundError"
    unhidden = tmp_path / "work-plain"
    unhidden.mkdir()
    report = _run(Sandbox(SandboxPolicy(data_dir)), unhidden, shared)
    assert report["list_keys"] == "blocked: PermissionError"
