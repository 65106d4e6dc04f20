"""source.py against real git repositories: resolving, verifying and exporting commits."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from shipyard.build.source import (
    branch_head,
    export_commit,
    fetch_source,
    normalize_repository,
    read_manifest_at,
    resolve_source,
)
from shipyard.domain.models import SourceConfig
from shipyard.errors import ManifestError, SourceError

from .helpers import GitRepo, GitServer


async def test_fetch_exports_the_commit_tree_and_reads_the_manifest(
    repo: GitRepo, data_dir: Path
) -> None:
    repo.write("bin/run.sh", "#!/bin/sh\necho hi\n", executable=True)
    repo.write("deep/a/b.txt", "b\n")
    repo.symlink("latest", "deep/a/b.txt")
    commit = repo.commit("more")

    checkout = await fetch_source(repo.source(commit), cache_dir=data_dir)

    ws = checkout.workspace
    assert checkout.commit == commit
    assert checkout.tree == repo.git("rev-parse", f"{commit}^{{tree}}")
    assert checkout.manifest.service.name == "hello"
    assert (ws / "app.py").read_text() == "print('hello')\n"
    assert stat.S_IMODE((ws / "bin/run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((ws / "app.py").stat().st_mode) == 0o644
    assert os.readlink(ws / "latest") == "deep/a/b.txt"
    assert not (ws / ".git").exists()
    assert sorted(p.name for p in ws.iterdir()) == [
        "app.py",
        "bin",
        "deep",
        "latest",
        "shipyard.toml",
    ]


async def test_abbreviated_commit_resolves_to_the_full_id(repo: GitRepo, data_dir: Path) -> None:
    full = repo.head()
    resolved = await resolve_source(repo.source(full[:7]), cache_dir=data_dir)
    assert resolved.commit == full


async def test_older_commit_on_the_branch_is_accepted(repo: GitRepo, data_dir: Path) -> None:
    old = repo.head()
    repo.write("app.py", "print('v2')\n")
    repo.commit("v2")
    checkout = await fetch_source(repo.source(old), cache_dir=data_dir)
    assert (checkout.workspace / "app.py").read_text() == "print('hello')\n"


async def test_the_mirror_is_reused_and_updated(repo: GitRepo, data_dir: Path) -> None:
    first = await resolve_source(repo.source(), cache_dir=data_dir)
    repo.write("app.py", "print('v2')\n")
    new = repo.commit("v2")
    second = await resolve_source(repo.source(new), cache_dir=data_dir)
    assert second.mirror == first.mirror
    assert second.commit == new
    assert len(list((data_dir / "git").glob("*.git"))) == 1


async def test_branch_head(repo: GitRepo, data_dir: Path) -> None:
    assert await branch_head(str(repo.path), "main", cache_dir=data_dir) == repo.head()


async def test_read_manifest_at_needs_no_checkout(repo: GitRepo, data_dir: Path) -> None:
    resolved = await resolve_source(repo.source(), cache_dir=data_dir)
    manifest = await read_manifest_at(resolved)
    assert manifest.run.argv == ["python", "app.py"]


async def test_export_into_a_chosen_directory(
    repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    resolved = await resolve_source(repo.source(), cache_dir=data_dir)
    await export_commit(resolved, tmp_path / "out")
    assert (tmp_path / "out" / "shipyard.toml").is_file()


# --- what is refused --------------------------------------------------------------------------


async def test_unknown_repository(tmp_path: Path, data_dir: Path) -> None:
    source = SourceConfig(repository=str(tmp_path / "nope"), branch="main", commit="abcd")
    with pytest.raises(SourceError, match="not found"):
        await resolve_source(source, cache_dir=data_dir)


async def test_directory_that_is_not_a_repository(tmp_path: Path, data_dir: Path) -> None:
    (tmp_path / "plain").mkdir()
    source = SourceConfig(repository=str(tmp_path / "plain"), branch="main", commit="abcd")
    with pytest.raises(SourceError, match="could not be fetched"):
        await resolve_source(source, cache_dir=data_dir)
    assert list((data_dir / "git").glob("*.git")) == []  # no empty mirror left behind


async def test_unknown_branch(repo: GitRepo, data_dir: Path) -> None:
    with pytest.raises(SourceError, match="branch 'release' not found in"):
        await resolve_source(repo.source(branch="release"), cache_dir=data_dir)


async def test_unknown_commit(repo: GitRepo, data_dir: Path) -> None:
    with pytest.raises(
        SourceError, match=r"commit 0123456789ab not found in .*repo \(branch main\)"
    ):
        await resolve_source(repo.source("0123456789ab"), cache_dir=data_dir)


async def test_commit_not_on_branch(repo: GitRepo, data_dir: Path) -> None:
    repo.switch("feature", create=True)
    repo.write("feature.txt", "wip\n")
    feature = repo.commit("feature work")
    repo.switch("main")
    with pytest.raises(SourceError, match=f"commit {feature} is not on branch main"):
        await resolve_source(repo.source(feature, branch="main"), cache_dir=data_dir)
    resolved = await resolve_source(repo.source(feature, branch="feature"), cache_dir=data_dir)
    assert resolved.commit == feature


async def test_a_branch_named_like_a_commit_does_not_resolve_as_one(
    repo: GitRepo, data_dir: Path
) -> None:
    # rev-parse prefers refs over abbreviated ids; a branch called "deadbeef" must not make
    # commit "deadbeef" resolve to that branch's tip.
    repo.git("branch", "deadbeef")
    with pytest.raises(SourceError, match="commit deadbeef not found"):
        await resolve_source(repo.source("deadbeef"), cache_dir=data_dir)


async def test_a_blob_id_is_not_a_commit(repo: GitRepo, data_dir: Path) -> None:
    blob = repo.git("rev-parse", "HEAD:app.py")
    with pytest.raises(SourceError, match="not found"):
        await resolve_source(repo.source(blob), cache_dir=data_dir)


@pytest.mark.parametrize(
    "repository",
    [
        pytest.param("--upload-pack=touch {pwned}", id="option-as-repository"),
        pytest.param("ext::sh -c touch% {pwned}", id="ext-transport"),
        pytest.param("fd::17", id="fd-transport"),
        pytest.param("ftp://example.invalid/repo.git", id="unsupported-scheme"),
    ],
)
async def test_repository_cannot_become_an_option_or_a_command(
    repository: str, tmp_path: Path, data_dir: Path
) -> None:
    pwned = tmp_path / "pwned"
    source = SourceConfig(repository=repository.format(pwned=pwned), branch="main", commit="abcd")
    with pytest.raises(SourceError):
        await resolve_source(source, cache_dir=data_dir)
    assert not pwned.exists()


@pytest.mark.parametrize(
    "branch",
    ["--upload-pack=touch /tmp/x", "-b", "main..other", "ma:in", "main^", "a/.hidden", "x.lock"],
)
async def test_branch_cannot_become_an_option_or_a_range(
    branch: str, repo: GitRepo, data_dir: Path
) -> None:
    # The wire model rejects the worst; source.py checks again for callers that construct
    # configs without validation.
    unchecked = SourceConfig.model_construct(
        repository=str(repo.path), branch=branch, commit=repo.head(), dockerfile=None
    )
    with pytest.raises(SourceError, match="not a valid git branch name"):
        await resolve_source(unchecked, cache_dir=data_dir)


def test_the_wire_model_rejects_option_like_branches_and_non_hex_commits() -> None:
    with pytest.raises(ValidationError):
        SourceConfig(repository="/x", branch="--output=/tmp/x", commit="abcd")
    with pytest.raises(ValidationError):
        SourceConfig(repository="/x", branch="main", commit="--all")


async def test_non_hex_commit_is_refused_even_unvalidated(repo: GitRepo, data_dir: Path) -> None:
    unchecked = SourceConfig.model_construct(
        repository=str(repo.path), branch="main", commit="--all", dockerfile=None
    )
    with pytest.raises(SourceError, match="not a hex commit id"):
        await resolve_source(unchecked, cache_dir=data_dir)


def test_normalize_repository(tmp_path: Path) -> None:
    assert normalize_repository(f"file://{tmp_path}") == str(tmp_path.resolve())
    assert normalize_repository("HTTPS://Example.com/org/repo.git/") == (
        "https://example.com/org/repo.git"
    )
    assert normalize_repository("git@github.com:org/repo.git") == "git@github.com:org/repo.git"


async def test_a_url_with_credentials_is_refused_before_git_runs(data_dir: Path) -> None:
    secret = "glpat-neverInAMirror"
    url = f"https://oauth2:{secret}@git.example.invalid/org/repo.git"
    with pytest.raises(SourceError, match="credential helper") as info:
        await branch_head(url, "main", cache_dir=data_dir)
    assert "https://***@git.example.invalid/org/repo.git" in info.value.message
    assert secret not in str(info.value)
    assert not (data_dir / "git").exists()  # no mirror was made (it records its location)


# --- manifests --------------------------------------------------------------------------------


async def test_missing_manifest(repo: GitRepo, data_dir: Path) -> None:
    repo.remove("shipyard.toml")
    commit = repo.commit("no manifest")
    with pytest.raises(ManifestError, match=r"shipyard\.toml not found"):
        await fetch_source(repo.source(commit), cache_dir=data_dir)


async def test_invalid_manifest_names_the_field(repo: GitRepo, data_dir: Path) -> None:
    repo.write("shipyard.toml", '[service]\nname = "Not A Label"\n[run]\ncommand = "x"\n')
    commit = repo.commit("bad manifest")
    with pytest.raises(ManifestError, match=r"service\.name"):
        await fetch_source(repo.source(commit), cache_dir=data_dir)


async def test_manifest_that_is_not_toml(repo: GitRepo, data_dir: Path) -> None:
    repo.write("shipyard.toml", "[service\n")
    commit = repo.commit("broken toml")
    with pytest.raises(ManifestError, match="not valid TOML"):
        await fetch_source(repo.source(commit), cache_dir=data_dir)


async def test_remote_repository_over_git_protocol(
    repo: GitRepo, git_server: GitServer, data_dir: Path
) -> None:
    url = git_server.url("repo")
    source = SourceConfig(repository=url, branch="main", commit=repo.head()[:8])
    checkout = await fetch_source(source, cache_dir=data_dir)
    assert checkout.commit == repo.head()
    assert checkout.source.location == url
    assert (checkout.workspace / "app.py").is_file()
    missing = SourceConfig(repository=git_server.url("nope"), branch="main", commit="abcd")
    with pytest.raises(SourceError, match="could not be fetched"):
        await resolve_source(missing, cache_dir=data_dir)
