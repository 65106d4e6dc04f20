"""``shipyard build`` in-process (Typer's CliRunner) against real repositories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shipyard.cli.build import build_app

from .helpers import GitRepo, manifest

runner = CliRunner()


def _with_build(repo: GitRepo, build: str) -> str:
    repo.write("shipyard.toml", manifest(build))
    return repo.commit("build config")


def test_table_output_and_logs_on_stderr(repo: GitRepo, data_dir: Path) -> None:
    commit = _with_build(repo, "command = \"sh -c 'echo compiling now'\"")
    result = runner.invoke(
        build_app, [str(repo.path), "--commit", commit[:10], "--data-dir", str(data_dir)]
    )
    assert result.exit_code == 0, result.output
    assert "compiling now" in result.stderr
    assert "compiling now" not in result.stdout
    assert "sha256:" in result.stdout
    assert "artifact cache" in result.stdout and "miss" in result.stdout
    assert "within" in result.stdout


def test_json_output_defaults_to_the_branch_head(repo: GitRepo, data_dir: Path) -> None:
    args = [str(repo.path), "--data-dir", str(data_dir), "--format", "json"]
    first = runner.invoke(build_app, args)
    assert first.exit_code == 0, first.output
    built = json.loads(first.stdout)
    assert built["commit"] == repo.head()
    assert built["digest"].startswith("sha256:")
    assert built["cache"]["artifact_hit"] is False
    assert built["build_time_ok"] is True
    assert built["build_time_target_ms"] == 240_000
    again = json.loads(runner.invoke(build_app, args).stdout)
    assert again["cache"]["artifact_hit"] is True
    assert again["digest"] == built["digest"]


def test_no_cache_builds_afresh(repo: GitRepo, data_dir: Path, tmp_path: Path) -> None:
    commit = _with_build(repo, "command = \"sh -c 'echo built'\"")
    args = [str(repo.path), "--commit", commit, "--data-dir", str(data_dir)]
    first = runner.invoke(build_app, [*args, "--format", "json"])
    assert first.exit_code == 0, first.output

    result = runner.invoke(build_app, [*args, "--format", "json", "--no-cache"])
    assert result.exit_code == 0, result.output
    fresh = json.loads(result.stdout)
    assert fresh["cache"]["artifact_hit"] is False and fresh["cache"]["no_cache"] is True
    assert fresh["digest"] == json.loads(first.stdout)["digest"]
    logs = [p.read_text() for p in (data_dir / "logs").glob("*.log")]
    assert sum(log.count("[shipyard] build command: ") for log in logs) == 2  # it ran again

    table = runner.invoke(build_app, [*args, "--no-cache"])
    assert table.exit_code == 0, table.output
    assert "not used (--no-cache)" in table.stdout
    assert "no_cache requested" in table.stderr  # the build log says so too


def test_a_modified_cached_artifact_is_rebuilt_and_the_table_says_why(
    repo: GitRepo, data_dir: Path
) -> None:
    args = [str(repo.path), "--data-dir", str(data_dir)]
    built = json.loads(runner.invoke(build_app, [*args, "--format", "json"]).stdout)
    location = Path(built["location"])
    location.chmod(0o755)
    (location / "__pycache__").mkdir()

    result = runner.invoke(build_app, args)
    assert result.exit_code == 0, result.output
    assert "rejected, rebuilt:" in result.stdout  # the reason follows (wrapped at 80 columns)
    assert f"cached artifact {built['digest']} failed verification" in result.stderr
    assert not (location / "__pycache__").exists()


def test_failed_build_exits_1_with_the_cause(repo: GitRepo, data_dir: Path) -> None:
    commit = _with_build(repo, "command = \"sh -c 'echo missing header >&2; exit 4'\"")
    result = runner.invoke(
        build_app, [str(repo.path), "--commit", commit, "--data-dir", str(data_dir)]
    )
    assert result.exit_code == 1
    assert "build failed" in result.stderr
    assert "exited with code 4" in result.stderr
    assert "missing header" in result.stderr
    assert "full log:" in result.stderr


def test_unconfigured_builder_exits_1(repo: GitRepo, data_dir: Path) -> None:
    commit = _with_build(repo, 'builder = "cloudbuild"')
    result = runner.invoke(
        build_app, [str(repo.path), "--commit", commit, "--data-dir", str(data_dir)]
    )
    assert result.exit_code == 1
    assert "'cloudbuild' builder is not configured" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--commit", "0123456789ab"], "not found", id="unknown-commit"),
        pytest.param(["--commit", "not-hex"], "hex commit id", id="non-hex-commit"),
        pytest.param(["--branch", "nope"], "branch 'nope' not found", id="unknown-branch"),
        pytest.param(["--branch", "--upload-pack=x"], "not a valid git branch", id="option-branch"),
        pytest.param(["--format", "yaml"], "yaml", id="bad-format"),
    ],
)
def test_bad_input_exits_2(args: list[str], message: str, repo: GitRepo, data_dir: Path) -> None:
    result = runner.invoke(build_app, [str(repo.path), "--data-dir", str(data_dir), *args])
    assert result.exit_code == 2
    assert message in result.stderr


def test_unknown_repository_exits_2(tmp_path: Path, data_dir: Path) -> None:
    result = runner.invoke(build_app, [str(tmp_path / "nope"), "--data-dir", str(data_dir)])
    assert result.exit_code == 2
    assert "not found" in result.stderr


def test_invalid_manifest_exits_2(repo: GitRepo, data_dir: Path) -> None:
    commit = _with_build(repo, "timeout_seconds = -1")
    result = runner.invoke(
        build_app, [str(repo.path), "--commit", commit, "--data-dir", str(data_dir)]
    )
    assert result.exit_code == 2
    assert "build.timeout_seconds" in result.stderr


def test_builders_config_file(repo: GitRepo, data_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "builders.json"
    bad.write_text("[1]")
    result = runner.invoke(
        build_app, [str(repo.path), "--data-dir", str(data_dir), "--builders-config", str(bad)]
    )
    assert result.exit_code == 2
    assert "expected an object" in result.stderr
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"local": {"link_dependencies": "hardlink"}}))
    result = runner.invoke(
        build_app, [str(repo.path), "--data-dir", str(data_dir), "--builders-config", str(good)]
    )
    assert result.exit_code == 0, result.output


def test_a_url_with_credentials_exits_2_without_echoing_it(data_dir: Path) -> None:
    secret = "ghp_buildNeverEchoes"
    url = f"https://{secret}@git.example.invalid/org/repo.git"
    result = runner.invoke(build_app, [url, "--data-dir", str(data_dir)])
    assert result.exit_code == 2, result.output
    assert "https://***@git.example.invalid/org/repo.git" in result.stderr
    assert secret not in result.output
    assert not (data_dir / "git").exists()
