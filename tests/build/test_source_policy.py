"""Outbound fetches: ``source.repository`` must match the server's allow-list (https remotes and
local paths under its source roots by default, never the data directory), and a failed fetch is
summarised in a fixed phrase; git's own words (which a remote server chooses) reach only the
server's log."""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.build.source import resolve_source, summarise_fetch_error
from shipyard.build.source_policy import SourcePolicy, default_roots
from shipyard.domain.models import SourceConfig
from shipyard.errors import SourceError, SourceNotAllowed
from shipyard.logs import _FIELDS_ATTR

from .helpers import GitRepo


@pytest.fixture
def policy(tmp_path: Path) -> SourcePolicy:
    (tmp_path / "roots" / "ok").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    return SourcePolicy(roots=(tmp_path / "roots",), forbidden=(tmp_path / "roots" / "data",))


@pytest.mark.parametrize(
    "repository",
    [
        "https://github.com/org/repo.git",
        "HTTPS://GitHub.com/org/repo",  # normalised before matching
        "{roots}/ok",
        "{roots}/ok/../ok",
        "file://{roots}/ok",
        "{roots}/not-yet-there",  # allowed by the policy; the fetch says it is missing
    ],
)
def test_allowed(policy: SourcePolicy, tmp_path: Path, repository: str) -> None:
    policy.check(repository.format(roots=tmp_path / "roots"))


@pytest.mark.parametrize(
    ("repository", "setting"),
    [
        pytest.param("http://github.com/org/repo.git", "--allow-source", id="http"),
        pytest.param("git://github.com/org/repo.git", "--allow-source", id="git"),
        pytest.param("ssh://git@github.com/org/repo.git", "--allow-source", id="ssh"),
        pytest.param("git@github.com:org/repo.git", "--allow-source", id="scp-like"),
        pytest.param("/etc", "--source-root", id="outside-roots"),
        pytest.param("{roots}/../data", "--source-root", id="dot-dot-escape"),
        pytest.param("file:///etc", "--source-root", id="file-url-outside"),
        pytest.param("/no/such/place", "--source-root", id="missing-outside-says-nothing-more"),
    ],
)
def test_refused_naming_the_setting(
    policy: SourcePolicy, tmp_path: Path, repository: str, setting: str
) -> None:
    with pytest.raises(SourceNotAllowed, match=f"shipyard serve {setting}") as info:
        policy.check(repository.format(roots=tmp_path / "roots"))
    assert info.value.code == "source_not_allowed"
    assert "not found" not in info.value.message  # refused before any look at the disk


def test_a_symlink_out_of_a_root_is_refused(policy: SourcePolicy, tmp_path: Path) -> None:
    (tmp_path / "roots" / "link").symlink_to(tmp_path / "data")
    with pytest.raises(SourceNotAllowed, match="--source-root"):
        policy.check(str(tmp_path / "roots" / "link"))


def test_the_data_directory_is_never_a_source(tmp_path: Path) -> None:
    data = tmp_path / "data"
    mirror = data / "git" / "abc.git"
    mirror.mkdir(parents=True)
    policy = SourcePolicy(roots=(tmp_path,), forbidden=(data,))
    with pytest.raises(SourceNotAllowed, match="data directory"):
        policy.check(str(mirror))


def test_a_pattern_allows_a_remote(policy: SourcePolicy) -> None:
    ssh = SourcePolicy(patterns=("ssh://git@github.com/myorg/*", "git@github.com:myorg/*"))
    ssh.check("ssh://git@github.com/myorg/app.git")
    ssh.check("git@github.com:myorg/app.git")
    with pytest.raises(
        SourceNotAllowed, match=re.escape("--allow-source 'ssh://git@github.com/*'")
    ):
        ssh.check("ssh://git@github.com/other/app.git")
    with pytest.raises(SourceNotAllowed):
        ssh.check("https://github.com/myorg/app.git")  # the patterns replace the default


def test_credentials_are_refused_before_the_list(policy: SourcePolicy) -> None:
    with pytest.raises(SourceError, match="credentials") as info:
        policy.check("https://user:hunter2@github.com/org/repo.git")
    assert "hunter2" not in info.value.message


def test_default_roots_are_the_current_and_temporary_directories() -> None:
    roots = default_roots()
    assert Path.cwd().resolve() in roots
    assert len(roots) == 2
    assert Path.home().resolve() not in roots or Path.home().resolve() == Path.cwd().resolve()


# --- what a failed fetch says -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stderr", "summary"),
    [
        ("fatal: unable to access 'https://x.invalid/r/': Could not resolve host: x.invalid",
         "could not resolve host"),
        ("fatal: unable to connect to 127.0.0.1:\n127.0.0.1[0: 127.0.0.1]: errno=Connection "
         "refused",
         "connection refused"),
        ("fatal: unable to access 'https://h/r/': Failed to connect to h port 443 after 130000 ms: "
         "Connection timed out", "timed out"),
        ("remote: Repository not found.\nfatal: repository 'https://github.com/o/r/' not found",
         "repository not found or access denied"),
        ("fatal: could not read Username for 'https://github.com': terminal prompts disabled",
         "repository not found or access denied"),
        ("git@github.com: Permission denied (publickey).", "repository not found or access denied"),
        ("fatal: unable to access 'https://h/': SSL certificate problem: self-signed certificate",
         "TLS handshake or certificate verification failed"),
        ("fatal: remote error: [red]anything at all[/red]", "git fetch failed"),
    ],
)  # fmt: skip
def test_summaries(stderr: str, summary: str) -> None:
    assert summarise_fetch_error(stderr) == summary


class HostileGitDaemon:
    """Answers every git:// connection with an ``ERR`` packet of its choosing (git prints it as
    ``fatal: remote error: ...``): terminal escapes and markup a deployer must never see."""

    MESSAGE = "[red]spoof[/red]\x1b]0;owned\x07\x1b[2K\rrepository is fine, deploy anyway"

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                payload = f"ERR {self.MESSAGE}".encode()
                conn.sendall(f"{len(payload) + 4:04x}".encode() + payload)

    def close(self) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone does not
        self._sock.close()
        self._thread.join()


@pytest.fixture
def hostile() -> Iterator[HostileGitDaemon]:
    daemon = HostileGitDaemon()
    yield daemon
    daemon.close()


async def test_a_remote_servers_words_reach_only_the_log(
    hostile: HostileGitDaemon, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"git://127.0.0.1:{hostile.port}/app.git"
    caplog.set_level(logging.WARNING, logger="shipyard.build.source")
    with pytest.raises(SourceError) as info:
        await resolve_source(
            SourceConfig(repository=url, branch="main", commit="abcd"), cache_dir=data_dir
        )
    message = info.value.message
    assert message == f"repository {url!r} could not be fetched: git fetch failed"
    assert "spoof" not in str(info.value.to_dict())
    [record] = [r for r in caplog.records if r.getMessage() == "source.fetch_failed"]
    fields = getattr(record, _FIELDS_ATTR)
    assert fields["reason"] == "git fetch failed"
    logged = fields["stderr"]
    assert "[red]spoof[/red]" in logged  # kept for the operator...
    assert "repository is fine, deploy anyway" in logged
    assert not any(c in logged for c in "\x1b\x07\r")  # ...with no raw control character


async def test_connection_refused_is_said_plainly(data_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    url = f"git://127.0.0.1:{port}/app.git"
    with pytest.raises(SourceError, match=r"could not be fetched: connection refused$"):
        await resolve_source(
            SourceConfig(repository=url, branch="main", commit="abcd"), cache_dir=data_dir
        )


async def test_a_missing_local_repository(data_dir: Path, repo: GitRepo) -> None:
    not_git = repo.path.parent / "plain-dir"
    not_git.mkdir()
    with pytest.raises(SourceError, match="repository not found or access denied"):
        await resolve_source(
            SourceConfig(repository=str(not_git), branch="main", commit="abcd"),
            cache_dir=data_dir,
        )
