"""The one writer of key and token files: the mode at every step, symlinks refused, directories
others may write refused, atomic replacement, create-once under a race, and that the modules
which keep secrets (API key, signing key, agent token and state) go through it."""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shipyard import private_files
from shipyard.agent.server import Agent
from shipyard.api.auth import TokenAuthority
from shipyard.errors import PrivateFileUnsafe
from shipyard.private_files import create_private, write_private
from shipyard.security.signing import Ed25519Signer

SRC = Path(private_files.__file__).parent


class StepSpy:
    """Stands in for ``os`` inside ``private_files`` only: after every call it made, runs
    ``check`` (so a test sees the directory as it is between any two system calls)."""

    def __init__(self, check: Callable[[str], None], fail_on: str | None = None) -> None:
        self.calls: list[str] = []
        self._check = check
        self._fail_on = fail_on

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if not callable(real):
            return real

        def call(*args: Any, **kwargs: Any) -> Any:
            if name == self._fail_on:
                raise OSError(28, "No space left on device (injected)")
            result = real(*args, **kwargs)
            self.calls.append(name)
            self._check(name)
            return result

        return call


@pytest.fixture
def private_dir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def no_umask() -> Iterator[None]:
    """umask 0: whatever mode a file gets is the mode the code asked for, nothing narrower."""
    old = os.umask(0)
    yield
    os.umask(old)


def entries(directory: Path) -> dict[str, int]:
    """name -> permission bits of every entry, without following symlinks."""
    return {p.name: stat.S_IMODE(p.lstat().st_mode) for p in directory.iterdir()}


@pytest.mark.usefixtures("no_umask")
@pytest.mark.parametrize("write", [write_private, create_private], ids=["replace", "create"])
def test_no_file_in_the_directory_is_ever_readable_by_others(
    private_dir: Path, monkeypatch: pytest.MonkeyPatch, write: Callable[[Path, bytes], Any]
) -> None:
    seen: list[dict[str, int]] = []

    def check(_: str) -> None:
        now = entries(private_dir)
        seen.append(now)
        assert all(mode == 0o600 for mode in now.values()), now

    spy = StepSpy(check)
    monkeypatch.setattr(private_files, "os", spy)
    write(private_dir / "signing.key", b"secret bytes")
    monkeypatch.undo()

    assert {"open", "write", "fsync"} <= set(spy.calls)
    assert any(name.endswith(".tmp") for snapshot in seen for name in snapshot)  # it was seen
    assert entries(private_dir) == {"signing.key": 0o600}
    assert (private_dir / "signing.key").read_bytes() == b"secret bytes"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o277], ids=["022", "077", "277"])
def test_the_mode_is_exactly_0600_whatever_the_umask(private_dir: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_private(private_dir / "agent.token", "t0ken")
    finally:
        os.umask(old)

    assert entries(private_dir) == {"agent.token": 0o600}


def test_a_replacement_is_atomic_readers_see_old_or_new(
    private_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = private_dir / "state.json"
    write_private(target, "old " * 1000)
    before = target.stat().st_ino
    contents: list[str] = []
    monkeypatch.setattr(private_files, "os", StepSpy(lambda _: contents.append(target.read_text())))
    write_private(target, "new " * 1000)
    monkeypatch.undo()

    assert set(contents) == {"old " * 1000, "new " * 1000}
    assert contents[0] == "old " * 1000 and contents[-1] == "new " * 1000
    assert target.stat().st_ino != before  # a new file renamed into place, not rewritten
    assert entries(private_dir) == {"state.json": 0o600}


@pytest.mark.parametrize("failing_call", ["write", "fsync", "replace"])
def test_a_failed_replacement_keeps_the_old_file_and_leaves_no_temp(
    private_dir: Path, monkeypatch: pytest.MonkeyPatch, failing_call: str
) -> None:
    target = private_dir / "agent.json"
    write_private(target, "old")
    monkeypatch.setattr(private_files, "os", StepSpy(lambda _: None, fail_on=failing_call))

    with pytest.raises(OSError, match="injected"):
        write_private(target, "new")
    monkeypatch.undo()

    assert target.read_text() == "old"
    assert entries(private_dir) == {"agent.json": 0o600}


@pytest.mark.parametrize("write", [write_private, create_private], ids=["replace", "create"])
@pytest.mark.parametrize("victim_exists", [True, False], ids=["to-file", "dangling"])
def test_a_symlink_in_place_of_the_file_is_refused(
    private_dir: Path,
    tmp_path: Path,
    write: Callable[[Path, bytes], Any],
    victim_exists: bool,
) -> None:
    victim = tmp_path / "victim"
    if victim_exists:
        victim.write_text("precious")
    (private_dir / "jwt.key").symlink_to(victim)

    with pytest.raises(PrivateFileUnsafe, match="symlink"):
        write(private_dir / "jwt.key", b"secret")

    assert (private_dir / "jwt.key").is_symlink()
    if victim_exists:
        assert victim.read_text() == "precious"
    else:
        assert not victim.exists()
    assert sorted(entries(private_dir)) == ["jwt.key"]  # no temp file left behind


@pytest.mark.parametrize("mode", [0o770, 0o720, 0o707, 0o777, 0o1777], ids=oct)
@pytest.mark.parametrize("write", [write_private, create_private], ids=["replace", "create"])
def test_a_directory_others_may_write_is_refused(
    tmp_path: Path, mode: int, write: Callable[[Path, bytes], Any]
) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(mode)

    with pytest.raises(PrivateFileUnsafe, match=re.escape(f"chmod go-w {d}")):
        write(d / "agent.token", b"secret")

    assert list(d.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")
def test_a_directory_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 4242, -1)

    with pytest.raises(PrivateFileUnsafe, match="belongs to uid 4242"):
        write_private(d / "agent.token", "secret")

    assert list(d.iterdir()) == []


def test_a_missing_directory_is_an_error_not_created(tmp_path: Path) -> None:
    with pytest.raises(PrivateFileUnsafe, match="cannot open directory"):
        write_private(tmp_path / "nope" / "agent.token", "secret")
    assert not (tmp_path / "nope").exists()


def test_create_keeps_the_first_file(private_dir: Path) -> None:
    assert create_private(private_dir / "signing.key", b"first") is True
    assert create_private(private_dir / "signing.key", b"second") is False

    assert (private_dir / "signing.key").read_bytes() == b"first"
    assert entries(private_dir) == {"signing.key": 0o600}


def test_racing_creators_agree_on_one_file(private_dir: Path) -> None:
    barrier = threading.Barrier(8)
    won: list[bytes] = []

    def create(n: int) -> None:
        data = f"key-{n}".encode()
        barrier.wait()
        if create_private(private_dir / "jwt.key", data):
            won.append(data)

    threads = [threading.Thread(target=create, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(won) == 1
    assert (private_dir / "jwt.key").read_bytes() == won[0]
    assert entries(private_dir) == {"jwt.key": 0o600}


# --- every keeper of a secret writes through it --------------------------------------------------


def test_the_api_token_key_is_refused_in_a_directory_others_may_write(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir(mode=0o777)
    (tmp_path / "keys").chmod(0o777)

    with pytest.raises(PrivateFileUnsafe, match="writable by group or others"):
        TokenAuthority.from_data_dir(tmp_path)
    assert list((tmp_path / "keys").iterdir()) == []


def test_the_signing_key_is_refused_in_a_directory_others_may_write(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys").chmod(0o775)

    with pytest.raises(PrivateFileUnsafe, match="writable by group or others"):
        Ed25519Signer.load_or_create(tmp_path)
    assert list((tmp_path / "keys").iterdir()) == []


def test_the_agent_keeps_its_state_private(tmp_path: Path) -> None:
    agent = Agent(tmp_path, "eu")
    agent._save_state()

    assert stat.S_IMODE(agent.dir.stat().st_mode) == 0o700
    assert entries(agent.dir) == {"state.json": 0o600}


#: Modules that create files with an owner-only mode that are not secrets, and why.
_NOT_SECRETS = {
    "audit/log.py": "the anchor's lock file (an flock target; empty)",
    "agent/instance_lock.py": "the agent's lock file (an flock target; the holder's pid)",
    "build/cache.py": "the build cache's lock file (an flock target; empty)",
    "store/engine.py": "the SQLite store's migration lock file (an flock target; empty)",
    "build/source.py": "the mirror's lock file (an flock target; empty)",
    "security/rootfs.py": "package metadata copied out of a scanned image (O_NOFOLLOW, temp dir)",
    "build/archive.py": "an artifact's file, private while written, then 0644/0755 (fchmod)",
    "security/pki.py": "the fleet directory's lock file (an flock target; empty; keys use "
    "private_files)",
    "api/fleet.py": "fleet.json's lock file (an flock target; empty; fleet.json uses "
    "private_files)",
}
#: Modules that write secrets private_files cannot: not the server's own 0600 files.
_OTHER_OWNERS = {
    "agent/secret_files.py": "an app's secret files: 0400, for the replica's uid, O_EXCL and "
    "O_NOFOLLOW in a directory made for them (0700), then handed over to that uid",
}


def test_no_other_module_creates_files_with_private_modes() -> None:
    """A new key or token writer must use private_files, not its own os.open(..., 0o600)."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "private_files.py" or rel in _NOT_SECRETS or rel in _OTHER_OWNERS:
            continue
        text = path.read_text()
        if re.search(r"\b0o[46]00\b", text):
            offenders.append(rel)

    assert offenders == []
