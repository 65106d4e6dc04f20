"""``shipyard deploy`` against real repositories: the defaults it fills in (the HEAD branch, as
``shipyard build``) and the message for each newcomer mistake, naming the real cause. Nothing is
sent to the API when the input is wrong (it answers through ``httpx.MockTransport``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.build.helpers import MANIFEST, GitRepo, GitServer
from typer.testing import CliRunner, Result

from shipyard.cli import main
from shipyard.cli.client import ApiClient

runner = CliRunner()
DEPLOYMENT_ID = "0b8f3a56-6c2f-4a53-9d6f-1f2d4c3b2a10"


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines are not wrapped: Rich folds a long path at a hyphen, which ``said`` cannot undo,
    and how long tmp_path is depends on the run (a pytest-xdist worker's adds ``popen-gwN/``)."""
    monkeypatch.setenv("COLUMNS", "1000")


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Bodies POSTed to /api/v1/deploy; the fake API accepts each with 202."""
    bodies: list[dict[str, Any]] = []

    def api(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(202, json={"deployment_id": DEPLOYMENT_ID})

    class MockedClient(ApiClient):
        def __init__(self, server: str, token: str, ca_cert: Path | None = None) -> None:
            self._c = httpx.Client(base_url=server, transport=httpx.MockTransport(api))

    monkeypatch.setattr(main, "ApiClient", MockedClient)
    return bodies


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    r = GitRepo(tmp_path / "repo")
    r.write("shipyard.toml", MANIFEST)
    r.write("app.py", "print('hello')\n")
    r.commit("initial")
    return r


@pytest.fixture
def git_server(tmp_path: Path) -> Iterator[GitServer]:
    server = GitServer(tmp_path)
    yield server
    server.close()


def deploy(*args: str) -> Result:
    return runner.invoke(main.app, ["deploy", *args, "--no-wait", "--token", "t"])


def said(result: Result) -> str:
    """stderr with Rich's line wrapping undone."""
    return " ".join(result.stderr.split())


def test_the_default_branch_is_the_checked_out_one(
    repo: GitRepo, sent: list[dict[str, Any]]
) -> None:
    repo.switch("trunk", create=True)
    head = repo.commit("on trunk", allow_empty=True)
    result = deploy(str(repo.path))
    assert result.exit_code == 0, result.output
    [body] = sent
    assert body["source"] == {"repository": str(repo.path), "branch": "trunk", "commit": head}
    assert body["target"]["service_name"] == "hello"


def test_a_remote_defaults_to_its_head_branch_not_main(
    repo: GitRepo, git_server: GitServer, tmp_path: Path, sent: list[dict[str, Any]]
) -> None:
    repo.switch("trunk", create=True)
    head = repo.commit("on trunk", allow_empty=True)
    repo.git("clone", "--quiet", "--bare", str(repo.path), str(tmp_path / "hello.git"))
    url = git_server.url("hello.git")
    result = deploy(url, "--service", "hello")
    assert result.exit_code == 0, result.output
    [body] = sent
    assert body["source"] == {"repository": url, "branch": "trunk", "commit": head}


def test_a_remote_without_service_says_why_it_is_needed(
    repo: GitRepo, git_server: GitServer, tmp_path: Path, sent: list[dict[str, Any]]
) -> None:
    repo.git("clone", "--quiet", "--bare", str(repo.path), str(tmp_path / "hello.git"))
    result = deploy(git_server.url("hello.git"))
    assert result.exit_code == 2
    assert "is a remote repository: its shipyard.toml is read by the server" in said(result)
    assert sent == []


def test_an_unknown_commit_is_named_with_the_repository_and_branch(
    repo: GitRepo, sent: list[dict[str, Any]]
) -> None:
    result = deploy(str(repo.path), "--commit", "deadbeef")
    assert result.exit_code == 2
    assert f"commit deadbeef not found in {repo.path} (branch main)" in said(result)
    assert "--service" not in result.stderr
    assert sent == []


def test_an_unknown_branch_is_named(repo: GitRepo, sent: list[dict[str, Any]]) -> None:
    result = deploy(str(repo.path), "--branch", "nope")
    assert result.exit_code == 2
    assert f"branch nope not found in {repo.path}" in said(result)
    assert sent == []


def test_a_missing_path_says_it_does_not_exist(tmp_path: Path, sent: list[dict[str, Any]]) -> None:
    missing = tmp_path / "no-such-dir"
    result = deploy(str(missing))
    assert result.exit_code == 2
    assert f"repository path {missing} does not exist" in said(result)
    assert sent == []


def test_a_directory_that_is_not_a_repository_says_so(
    tmp_path: Path, sent: list[dict[str, Any]]
) -> None:
    result = deploy(str(tmp_path))
    assert result.exit_code == 2
    assert f"{tmp_path} is not a git repository" in said(result)
    assert sent == []


def test_a_manifest_error_names_the_commit_it_was_read_from(
    repo: GitRepo, sent: list[dict[str, Any]]
) -> None:
    repo.write("shipyard.toml", '[service]\nname = "Not A Label"\n[run]\ncommand = "x"\n')
    bad = repo.commit("broken")
    result = deploy(str(repo.path))
    assert result.exit_code == 2
    assert f"shipyard.toml at commit {bad[:12]} (branch main): service.name" in said(result)
    assert sent == []


def test_a_commit_without_a_manifest_says_which_commit(
    repo: GitRepo, sent: list[dict[str, Any]]
) -> None:
    repo.remove("shipyard.toml")
    bare = repo.commit("no manifest")
    result = deploy(str(repo.path))
    assert result.exit_code == 2
    assert f"no shipyard.toml at commit {bare[:12]} (branch main) of {repo.path}" in said(result)
    assert sent == []


def test_a_busy_service_points_at_status_and_abort(
    repo: GitRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's 409 reaches the user whole: the running id and the commands to run."""
    problem = {
        "error": "deployment_in_progress",
        "detail": f"service hello in region local already has deployment {DEPLOYMENT_ID} in "
        f"progress: follow it with `shipyard status {DEPLOYMENT_ID}`, or stop it with "
        f"`shipyard abort {DEPLOYMENT_ID}` (traffic goes back to the stable revision)",
        "running_deployment_id": DEPLOYMENT_ID,
    }

    class MockedClient(ApiClient):
        def __init__(self, server: str, token: str, ca_cert: Path | None = None) -> None:
            self._c = httpx.Client(
                base_url=server,
                transport=httpx.MockTransport(lambda _: httpx.Response(409, json=problem)),
            )

    monkeypatch.setattr(main, "ApiClient", MockedClient)
    result = deploy(str(repo.path))
    assert result.exit_code == 2
    assert f"`shipyard abort {DEPLOYMENT_ID}`" in said(result)
    assert f"`shipyard status {DEPLOYMENT_ID}`" in said(result)
