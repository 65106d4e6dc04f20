"""``shipyard secret set|list|rm`` against the real API served by uvicorn (``LiveServer``) over
the pipeline on fakes: the value comes from stdin with one trailing newline stripped, an empty
one is refused before anything is sent, and no output shows it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.api.live import LiveServer
from tests.api.test_api import Harness
from typer.testing import CliRunner, Result

from shipyard.api.app import create_app
from shipyard.audit import MemoryAuditLog
from shipyard.cli import main
from shipyard.security.app_secrets import AppSecrets
from shipyard.security.sealing import Sealer
from shipyard.store.secrets import SecretStore

runner = CliRunner()
VALUE = "pa ss\nword-5e1f"


class Api:
    """The real app served by uvicorn on a thread, and what the store holds."""

    def __init__(self, h: Harness, port: int) -> None:
        self.h = h
        self.server = f"http://127.0.0.1:{port}"
        # Over the same database and key file as the server's (the only reader of values is
        # the orchestrator's; a test may read them to compare).
        self.secrets = AppSecrets(
            SecretStore(h.store.engine), Sealer.for_dir(h.settings.shared_dir), MemoryAuditLog()
        )

    def token(self, *perms: str) -> str:
        return self.h.issue(*perms).token

    def run(self, *args: str, perms: tuple[str, ...], stdin: str | None = None) -> Result:
        argv = ["secret", *args, "--server", self.server, "--token", self.token(*perms)]
        return runner.invoke(main.app, argv, input=stdin)

    def value_of(self, name: str, version: int) -> str:
        return asyncio.run(self.secrets.values("api", {name: version}))[name]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    h = Harness(tmp_path)
    with LiveServer(create_app(h.settings, context_factory=h.context), h.settings) as port:
        yield Api(h, port)


WRITE = ("secret:write",)
READ = ("deployment:read",)


def said(text: str) -> str:
    return " ".join(text.split())


def test_set_reads_stdin_and_strips_one_newline(api: Api) -> None:
    first = api.run("set", "api", "DB_PASSWORD", perms=WRITE, stdin=VALUE + "\n\n")
    assert first.exit_code == 0, first.output
    assert "set DB_PASSWORD of api: version 1" in said(first.stderr)
    assert api.value_of("DB_PASSWORD", 1) == VALUE + "\n"  # one newline only
    second = api.run("set", "api", "DB_PASSWORD", perms=WRITE, stdin=VALUE + "\r\n")
    assert second.exit_code == 0, second.output
    assert api.value_of("DB_PASSWORD", 2) == VALUE
    for result in (first, second):
        assert "5e1f" not in result.output


@pytest.mark.parametrize("given", ["", "\n"], ids=["nothing", "a-newline"])
def test_an_empty_value_is_refused_before_asking(api: Api, given: str) -> None:
    result = api.run("set", "api", "DB_PASSWORD", perms=WRITE, stdin=given)
    assert result.exit_code == 2
    assert "no value for DB_PASSWORD on stdin" in said(result.stderr)
    assert asyncio.run(api.secrets.list("api")) == []
    assert asyncio.run(api.h.audit.records()) == []


def test_list_and_rm(api: Api) -> None:
    for name in ("DB_PASSWORD", "API_KEY"):
        done = api.run("set", "api", name, perms=WRITE, stdin=VALUE)
        assert done.exit_code == 0, done.output
    listed = api.run("list", "api", perms=READ)
    assert listed.exit_code == 0, listed.output
    rows = [line.split() for line in listed.stdout.splitlines() if line.strip()]
    rows = [r for r in rows if r[0] in ("API_KEY", "DB_PASSWORD")]  # not the header, not rules
    assert [r[:2] for r in rows] == [["API_KEY", "1"], ["DB_PASSWORD", "1"]]
    assert all(r[-1] == "alice" for r in rows)
    assert "5e1f" not in listed.output
    removed = api.run("rm", "api", "API_KEY", perms=WRITE)
    assert removed.exit_code == 0, removed.output
    assert "removed API_KEY of api" in said(removed.stderr)
    again = api.run("rm", "api", "API_KEY", perms=WRITE)
    assert again.exit_code == 2 and "404" in again.stderr
    after = api.run("list", "api", perms=READ)
    assert "API_KEY" not in after.stdout and "DB_PASSWORD" in after.stdout


def test_a_token_without_secret_write_is_refused(api: Api) -> None:
    result = api.run(
        "set", "api", "DB_PASSWORD", perms=("deployment:create", "deployment:read"), stdin=VALUE
    )
    assert result.exit_code == 2
    assert "secret:write" in said(result.stderr)
