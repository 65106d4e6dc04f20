"""LocalBuilder end to end against real repositories and real processes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shipyard.build.base import Builder, BuildRequest
from shipyard.build.local import LocalBuilder, LocalBuilderConfig, digest_tree, verify_artifact
from shipyard.errors import ArtifactVerificationFailed, BuildFailed, ManifestError, SourceError
from shipyard.sandbox import Sandbox, SandboxPolicy

from .helpers import GitRepo, manifest


def _with_build(repo: GitRepo, build: str) -> str:
    repo.write("shipyard.toml", manifest(build))
    return repo.commit("build config")


async def test_builds_the_commit_into_a_sealed_artifact(repo: GitRepo, data_dir: Path) -> None:
    commit = _with_build(repo, "command = \"sh -c 'echo compiling; echo built > out.txt'\"")
    lines: list[str] = []
    builder: Builder = LocalBuilder(data_dir)

    artifact = await builder.build(BuildRequest(repo.source(commit), log_sink=lines.append))

    path = Path(artifact.location)
    assert path == data_dir / "artifacts" / ("sha256-" + artifact.digest.removeprefix("sha256:"))
    assert artifact.kind == "directory"
    assert artifact.builder == "local"
    assert artifact.commit == commit
    assert artifact.manifest.service.name == "hello"
    assert (path / "out.txt").read_text() == "built\n"
    assert (path / "app.py").is_file()
    assert digest_tree(path) == artifact.digest
    verify_artifact(path, artifact.digest)
    assert "compiling" in lines
    assert artifact.log_path is not None
    assert "compiling" in artifact.log_path.read_text()
    assert artifact.build_time_ok
    assert artifact.cache.artifact_hit is False
    assert artifact.cache.dependencies_hit is None
    assert not stat.S_IMODE((path / "out.txt").stat().st_mode) & 0o222  # read-only
    assert list((data_dir / "builds").iterdir()) == []  # workspace cleaned up


async def test_no_build_command_ships_the_tree(repo: GitRepo, data_dir: Path) -> None:
    artifact = await LocalBuilder(data_dir).build(BuildRequest(repo.source()))
    assert sorted(p.name for p in Path(artifact.location).iterdir()) == ["app.py", "shipyard.toml"]


async def test_failing_build_reports_exit_code_and_last_lines(
    repo: GitRepo, data_dir: Path
) -> None:
    commit = _with_build(repo, "command = \"sh -c 'echo step one; echo boom >&2; exit 3'\"")
    with pytest.raises(BuildFailed, match="exited with code 3") as info:
        await LocalBuilder(data_dir).build(BuildRequest(repo.source(commit)))
    assert "boom" in info.value.message
    assert info.value.detail["exit_code"] == 3
    assert info.value.detail["log_tail"][-2:] == ["step one", "boom"]
    assert "boom" in Path(info.value.detail["log_path"]).read_text()
    assert list((data_dir / "artifacts").glob("sha256-*")) == []
    assert list((data_dir / "builds").iterdir()) == []


async def test_missing_build_tool(repo: GitRepo, data_dir: Path) -> None:
    commit = _with_build(repo, 'command = "no-such-tool-xyz --flag"')
    with pytest.raises(BuildFailed, match="'no-such-tool-xyz' not found"):
        await LocalBuilder(data_dir).build(BuildRequest(repo.source(commit)))


async def test_timeout_kills_the_whole_process_group(
    repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    # A duration no other process uses: the background sleep is found by its command line
    # (sandboxed, its pid inside the build's PID namespace means nothing out here).
    commit = _with_build(repo, "timeout_seconds = 1\ncommand = \"sh -c 'sleep 61.4242 & wait'\"")
    with pytest.raises(BuildFailed, match=r"timed out.*timeout of 1 s") as info:
        await LocalBuilder(data_dir).build(BuildRequest(repo.source(commit)))
    assert info.value.detail["timeout_seconds"] == 1
    # The background sleep was in the build's process group: it is gone (or a zombie of init).
    assert _running("sleep\x0061.4242") == []


def _running(cmdline: str) -> list[int]:
    """Pids (not zombies) whose NUL-separated command line starts with ``cmdline``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_text().startswith(cmdline):
                status = (entry / "stat").read_text()
                if status.rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


async def test_environment_is_scrubbed(
    repo: GitRepo, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHIPYARD_API_TOKEN", "s3cret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    # The server runs from its own virtualenv: a build must not find its python or pip.
    server_venv = "/opt/shipyard-server/.venv"
    monkeypatch.setenv("VIRTUAL_ENV", server_venv)
    monkeypatch.setenv("PATH", f"{server_venv}/bin:{os.environ['PATH']}")
    commit = _with_build(
        repo, "command = \"sh -c 'env > env.txt; pwd > pwd.txt; echo x > $HOME/.toolrc'\""
    )
    artifact = await LocalBuilder(data_dir).build(BuildRequest(repo.source(commit)))
    env = dict(
        line.split("=", 1)
        for line in (Path(artifact.location) / "env.txt").read_text().splitlines()
        if "=" in line
    )
    assert "s3cret" not in (Path(artifact.location) / "env.txt").read_text()
    # HOME is scratch space outside the workspace: what tools leave there (settings, caches)
    # never becomes part of the artifact.
    workspace = (Path(artifact.location) / "pwd.txt").read_text().strip()
    assert not env["HOME"].startswith(workspace)
    assert not (Path(artifact.location) / ".toolrc").exists()
    assert env["LANG"] == "C.UTF-8"
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert server_venv not in (Path(artifact.location) / "env.txt").read_text()
    assert set(env) <= {
        "PATH",
        "HOME",
        "LANG",
        "TMPDIR",
        "XDG_CACHE_HOME",
        "SOURCE_DATE_EPOCH",
        "PWD",
        "SHLVL",
        "_",
    }


async def test_writing_beside_the_workspace_fails_the_build(repo: GitRepo, data_dir: Path) -> None:
    # Unsandboxed (--insecure-no-sandbox) it is detected, not prevented: the build root holds
    # only the workspace and a scratch dir, so anything else there came through "..".
    commit = _with_build(repo, "command = \"sh -c 'echo x > ../escape'\"")
    insecure = Sandbox(SandboxPolicy(data_dir, insecure=True))
    with pytest.raises(BuildFailed, match=r"wrote outside its workspace: \.\./escape"):
        await LocalBuilder(data_dir, sandbox=insecure).build(BuildRequest(repo.source(commit)))
    assert list((data_dir / "artifacts").glob("sha256-*")) == []


async def test_a_sandboxed_build_writes_nowhere_outside_its_tree(
    repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    """Beside the workspace, into the data directory, next to the repository: every write
    outside the tree and its scratch space lands in the sandbox's throwaway view or fails."""
    targets = [data_dir / "escape", tmp_path / "escape", Path("/var/tmp/shipyard-escape")]
    writes = "; ".join(f"echo x > {t}" for t in ["../escape", *targets])
    commit = _with_build(repo, f"command = \"sh -c '{writes}; true'\"")
    artifact = await LocalBuilder(data_dir).build(BuildRequest(repo.source(commit)))
    assert artifact.digest.startswith("sha256:")
    for target in targets:
        assert not target.exists(), target
    assert not (data_dir / "builds").exists() or not list((data_dir / "builds").rglob("escape"))


async def test_symlink_pointing_outside_fails_the_build(repo: GitRepo, data_dir: Path) -> None:
    commit = _with_build(repo, 'command = "ln -s /etc/passwd leak"')
    with pytest.raises(BuildFailed, match=r"symlink leak -> /etc/passwd points outside"):
        await LocalBuilder(data_dir).build(BuildRequest(repo.source(commit)))


async def test_source_and_manifest_errors_pass_through(repo: GitRepo, data_dir: Path) -> None:
    builder = LocalBuilder(data_dir)
    with pytest.raises(SourceError):
        await builder.build(BuildRequest(repo.source("0123456789ab")))
    repo.remove("shipyard.toml")
    commit = repo.commit("no manifest")
    with pytest.raises(ManifestError):
        await builder.build(BuildRequest(repo.source(commit)))


async def test_unknown_build_section_field_is_a_manifest_error(
    repo: GitRepo, data_dir: Path
) -> None:
    commit = _with_build(repo, 'comand = "make"')
    with pytest.raises(ManifestError, match=r"build\.comand"):
        await LocalBuilder(data_dir).build(BuildRequest(repo.source(commit)))


# --- digests ----------------------------------------------------------------------------------


async def test_digest_is_deterministic_across_data_dirs(repo: GitRepo, tmp_path: Path) -> None:
    commit = _with_build(repo, "command = \"sh -c 'mkdir -p gen/empty; echo 1 > gen/x'\"")
    a = await LocalBuilder(tmp_path / "d1").build(BuildRequest(repo.source(commit)))
    b = await LocalBuilder(tmp_path / "d2").build(BuildRequest(repo.source(commit)))
    assert a.digest == b.digest
    assert a.location != b.location


def _tree(root: Path) -> Path:
    (root / "sub" / "empty").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "sub" / "b.sh").write_text("#!/bin/sh\n")
    (root / "sub" / "b.sh").chmod(0o755)
    (root / "link").symlink_to("a.txt")
    return root


def test_digest_ignores_timestamps_and_write_bits(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t")
    before = digest_tree(root)
    os.utime(root / "a.txt", (0, 0))
    (root / "a.txt").chmod(0o444)
    assert digest_tree(root) == before
    assert digest_tree(_tree(tmp_path / "u")) == before


@pytest.mark.parametrize(
    "change",
    ["content", "exec-bit", "symlink-target", "new-empty-dir", "rename"],
)
def test_digest_changes_with_content(change: str, tmp_path: Path) -> None:
    root = _tree(tmp_path / "t")
    before = digest_tree(root)
    if change == "content":
        (root / "a.txt").write_text("b")
    elif change == "exec-bit":
        (root / "a.txt").chmod(0o755)
    elif change == "symlink-target":
        (root / "link").unlink()
        (root / "link").symlink_to("sub/b.sh")
    elif change == "new-empty-dir":
        (root / "sub" / "empty2").mkdir()
    else:
        (root / "a.txt").rename(root / "c.txt")
    assert digest_tree(root) != before


def test_digest_refuses_special_files(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t")
    os.mkfifo(root / "pipe")
    with pytest.raises(ValueError, match="pipe is not a file"):
        digest_tree(root)


async def test_verify_artifact_detects_tampering(repo: GitRepo, data_dir: Path) -> None:
    artifact = await LocalBuilder(data_dir).build(BuildRequest(repo.source()))
    path = Path(artifact.location)
    verify_artifact(path, artifact.digest)
    target = path / "app.py"
    target.chmod(0o644)
    target.write_text("print('evil')\n")
    with pytest.raises(ArtifactVerificationFailed, match="expected"):
        verify_artifact(path, artifact.digest)
    with pytest.raises(ArtifactVerificationFailed, match="missing"):
        verify_artifact(path.with_name("sha256-" + "0" * 64), "sha256:" + "0" * 64)


def test_builder_config_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="extra"):
        LocalBuilderConfig.model_validate({"kind": "local", "cache_max": 1})
