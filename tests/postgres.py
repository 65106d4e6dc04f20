"""A real PostgreSQL server of the session's own (``postgres_server``), and a fresh database per
test (``postgres_url``). A pytest plugin loaded by ``tests/conftest.py``; the bench and the HA
end-to-end suite use ``own_postgres`` directly.

Debian's ``postgresql`` package provides the binaries; nothing uses the system service. The
cluster lives in a temporary directory owned by the ``postgres`` user (``initdb`` refuses to run
as root), listens on loopback on a free port and on a socket in that directory, trusts local
connections (a throw-away cluster), and is stopped with ``pg_ctl stop -m immediate`` at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


@dataclass(frozen=True)
class PostgresServer:
    """A running cluster: ``url(name)`` is a SQLAlchemy URL (psycopg 3) for database ``name``."""

    host: str
    port: int
    directory: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{database}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(
            [
                _bin("psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed: {done.stderr.strip()}")
        return done.stdout


def _bin(name: str) -> str:
    for directory in BIN_DIRS:
        if (directory / name).exists():
            return str(directory / name)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: apt-get install postgresql")
    return found


def available() -> bool:
    try:
        _bin("initdb")
        pwd.getpwnam("postgres")
    except (FileNotFoundError, KeyError):
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the ``postgres`` user (root drops to it; that user runs it as is)."""
    user = pwd.getpwnam("postgres")

    def drop() -> None:
        if os.getuid() == 0:
            os.setgid(user.pw_gid)
            os.setgroups([])
            os.setuid(user.pw_uid)

    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": user.pw_dir}
    return subprocess.run(
        argv, preexec_fn=drop, env=env, capture_output=True, text=True, check=False
    )


@contextlib.contextmanager
def own_postgres() -> Iterator[PostgresServer]:
    """Start a PostgreSQL cluster of our own (initdb + pg_ctl), yield it, stop and remove it."""
    user = pwd.getpwnam("postgres")
    root = Path(tempfile.mkdtemp(prefix="shipyard-pg-"))
    os.chown(root, user.pw_uid, user.pw_gid)
    data = root / "data"
    init = _as_postgres(
        [
            _bin("initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]
    )
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {init.stderr.strip() or init.stdout.strip()}")
    for attempt in itertools.count():
        port = _free_port()
        options = (
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        started = _as_postgres(
            [
                _bin("pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "postgres.log"),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        if started.returncode == 0:
            break
        if attempt >= 2:  # the port was taken between choosing and binding, three times
            log = (root / "postgres.log").read_text(errors="replace")[-2000:]
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip()}\n{log}")
    try:
        yield PostgresServer("127.0.0.1", port, root)
    finally:
        _as_postgres([_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL (one per xdist worker), started on first use."""
    if not available():
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    with own_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server, for one test."""
    return postgres_server.create_database()
