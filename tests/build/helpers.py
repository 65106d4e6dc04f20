"""Helpers for the build tests: real git repositories with real commits and branches."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

from shipyard.domain.models import SourceConfig

MANIFEST = """\
[service]
name = "hello"

[run]
command = "python app.py"
"""

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
}


class GitRepo:
    """A throwaway repository driven through the git CLI, as a developer would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        self.git("init", "--quiet", "--initial-branch=main")

    def git(self, *args: str) -> str:
        env = {**os.environ, **_GIT_ENV, "HOME": str(self.path.parent)}
        done = subprocess.run(
            ["git", "-c", "commit.gpgsign=false", *args],
            cwd=self.path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    def write(self, rel: str, content: str, *, executable: bool = False) -> None:
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)
        p.chmod(0o755 if executable else 0o644)

    def copy_in(self, source: Path, rel: str) -> None:
        """Add a binary file (e.g. a static busybox for FROM scratch images)."""
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(source.read_bytes())
        p.chmod(0o755)

    def symlink(self, rel: str, target: str) -> None:
        (self.path / rel).symlink_to(target)

    def remove(self, rel: str) -> None:
        (self.path / rel).unlink()

    def commit(self, message: str = "change", *, allow_empty: bool = False) -> str:
        self.git("add", "--all")
        extra = ["--allow-empty"] if allow_empty else []
        self.git("commit", "--quiet", "-m", message, *extra)
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")

    def switch(self, branch: str, *, create: bool = False) -> None:
        self.git("switch", "--quiet", *(["-c"] if create else []), branch)

    def source(self, commit: str | None = None, *, branch: str = "main") -> SourceConfig:
        return SourceConfig(repository=str(self.path), branch=branch, commit=commit or self.head())


def manifest(build: str = "", *, name: str = "hello") -> str:
    """A manifest with the given [build] section body."""
    section = f"[build]\n{build}\n" if build else ""
    return f'[service]\nname = "{name}"\n{section}[run]\ncommand = "python app.py"\n'


class GitServer:
    """Serves repositories under ``base`` over ``git://`` on localhost: one listening socket we
    bind ourselves (ready before the first request, no polling), one ``git daemon --inetd`` per
    connection. Stands in for a remote such as GitHub where a builder needs a URL."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._children: list[subprocess.Popen[bytes]] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                self._children.append(
                    subprocess.Popen(
                        [
                            "git",
                            "daemon",
                            "--inetd",
                            "--export-all",
                            f"--base-path={self.base}",
                        ],
                        stdin=conn.fileno(),
                        stdout=conn.fileno(),
                        stderr=subprocess.DEVNULL,
                    )
                )

    def close(self) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join()
        for child in self._children:
            child.kill()
            child.wait()
