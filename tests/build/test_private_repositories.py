"""Private repositories the way README's 'Private repositories' says to reach them: the server's
user holds the credential (a git credential helper, or GIT_ASKPASS), the URL holds none. Against
a real password-protected HTTP git server (git's dumb HTTP protocol over a Basic-auth handler),
the fetch fails without the credential and succeeds with either, and the secret ends up in no
file under the data directory."""

from __future__ import annotations

import base64
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from shipyard.build.source import branch_head
from shipyard.errors import SourceError

from .helpers import GitRepo

USER, TOKEN = "ci", "glpat-private-repo-token"


class _AuthHandler(SimpleHTTPRequestHandler):
    expected = "Basic " + base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != self.expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the test asserts on outcomes, not access lines


@pytest.fixture
def private_url(repo: GitRepo, tmp_path: Path) -> Iterator[str]:
    """``http://127.0.0.1:PORT/repo.git``: a bare copy of ``repo`` behind Basic auth."""
    served = tmp_path / "served"
    served.mkdir()
    subprocess.run(
        ["git", "clone", "--quiet", "--bare", str(repo.path), str(served / "repo.git")],
        check=True,
    )
    subprocess.run(["git", "--git-dir", str(served / "repo.git"), "update-server-info"], check=True)

    def handler(*args: Any) -> _AuthHandler:
        return _AuthHandler(*args, directory=str(served))

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/repo.git"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def server_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The server user's HOME, empty: no credential unless a test puts one there."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.delenv("GIT_ASKPASS", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return home


def _no_secret_under(data_dir: Path) -> None:
    for f in data_dir.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f"{f} holds the token"


async def test_without_a_credential_the_fetch_fails(
    private_url: str, server_home: Path, data_dir: Path
) -> None:
    with pytest.raises(SourceError, match="could not be fetched"):
        await branch_head(private_url, "main", cache_dir=data_dir)


async def test_a_credential_helper_of_the_server_user(
    private_url: str, server_home: Path, data_dir: Path, repo: GitRepo
) -> None:
    # README's commands, run as the server's user.
    subprocess.run(["git", "config", "--global", "credential.helper", "store"], check=True)
    port = private_url.split(":")[2].split("/")[0]
    subprocess.run(
        ["git", "credential", "approve"],
        input=f"protocol=http\nhost=127.0.0.1:{port}\nusername={USER}\npassword={TOKEN}\n",
        text=True,
        check=True,
    )
    assert await branch_head(private_url, "main", cache_dir=data_dir) == repo.head()
    _no_secret_under(data_dir)


async def test_git_askpass_in_the_server_environment(
    private_url: str,
    server_home: Path,
    data_dir: Path,
    repo: GitRepo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    askpass = server_home / "askpass.sh"
    # git asks "Username for ...", then "Password for ..."; the script answers each.
    askpass.write_text(f'#!/bin/sh\ncase "$1" in Username*) echo {USER};; *) echo {TOKEN};; esac\n')
    askpass.chmod(0o700)
    monkeypatch.setenv("GIT_ASKPASS", str(askpass))
    assert await branch_head(private_url, "main", cache_dir=data_dir) == repo.head()
    _no_secret_under(data_dir)
