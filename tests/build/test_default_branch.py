"""The default branch is the repository's HEAD branch, found the same way by ``shipyard build``
and ``shipyard deploy`` (``source.default_branch``): a local checkout's current branch, a
remote's default branch; never an assumed ``main``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shipyard.build.source import default_branch
from shipyard.cli.build import build_app
from shipyard.errors import SourceError

from .helpers import GitRepo, GitServer

runner = CliRunner()


def _on_trunk(repo: GitRepo) -> str:
    """Move the repository to a branch named ``trunk`` with one commit more than ``main``."""
    repo.switch("trunk", create=True)
    repo.write("app.py", "print('trunk')\n")
    return repo.commit("on trunk")


async def test_a_local_checkout_defaults_to_its_current_branch(repo: GitRepo) -> None:
    assert await default_branch(str(repo.path)) == "main"
    _on_trunk(repo)
    assert await default_branch(str(repo.path)) == "trunk"


async def test_a_remote_defaults_to_its_head_branch(
    repo: GitRepo, git_server: GitServer, tmp_path: Path
) -> None:
    _on_trunk(repo)
    bare = tmp_path / "hello.git"
    repo.git("clone", "--quiet", "--bare", str(repo.path), str(bare))
    assert (bare / "HEAD").read_text().strip() == "ref: refs/heads/trunk"
    assert await default_branch(git_server.url("hello.git")) == "trunk"


async def test_a_detached_head_names_no_branch(repo: GitRepo) -> None:
    repo.git("checkout", "--quiet", "--detach")
    with pytest.raises(SourceError, match=r"has no default branch .* pass --branch"):
        await default_branch(str(repo.path))


async def test_an_unreachable_remote_says_so() -> None:
    with pytest.raises(SourceError, match="could not be read: "):
        await default_branch("git://127.0.0.1:9/nothing.git")


def test_build_without_branch_builds_the_head_branch(repo: GitRepo, data_dir: Path) -> None:
    head = _on_trunk(repo)
    repo.git("branch", "--quiet", "-D", "main")  # "main" would have been assumed before
    result = runner.invoke(
        build_app, [str(repo.path), "--data-dir", str(data_dir), "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["commit"] == head


def test_a_manifest_error_names_the_commit_it_was_read_from(repo: GitRepo, data_dir: Path) -> None:
    repo.write("shipyard.toml", '[service]\nname = "Not A Label"\n')
    bad = repo.commit("broken manifest")
    result = runner.invoke(build_app, [str(repo.path), "--data-dir", str(data_dir)])
    assert result.exit_code == 2
    said = " ".join(result.stderr.split())
    assert f"shipyard.toml at commit {bad[:12]} (branch main): service.name" in said
