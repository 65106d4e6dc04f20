"""The build cache: no-op rebuilds, the cargo-chef dependency layer, and LRU eviction.

"Did the command run?" is proven by counter files the commands append to at absolute paths
outside the build (which also shows what the escape check does not cover: absolute paths).
"""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from shipyard.build.base import BuildRequest
from shipyard.build.local import LocalBuilder, LocalBuilderConfig, verify_artifact
from shipyard.errors import BuildFailed

from .helpers import GitRepo, manifest


def _runs(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def _python_app(repo: GitRepo, tmp_path: Path, *, requirements: str = "requests==2.0\n") -> str:
    """An app whose dependency step 'installs' requirements.txt into .deps and counts itself."""
    deps_counter = tmp_path / "deps-runs"
    build_counter = tmp_path / "build-runs"
    repo.write("requirements.txt", requirements)
    repo.write(
        "shipyard.toml",
        manifest(
            f"dependencies = \"sh -c 'echo run >> {deps_counter}; mkdir -p .deps; "
            f"cp requirements.txt .deps/installed.txt; echo installed'\"\n"
            f"command = \"sh -c 'echo run >> {build_counter}; cat .deps/installed.txt "
            "> bundled.txt'\""
        ),
    )
    return repo.commit("python app")


async def test_identical_inputs_are_a_cache_hit_that_runs_nothing(
    repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    commit = _python_app(repo, tmp_path)
    builder = LocalBuilder(data_dir)
    first = await builder.build(BuildRequest(repo.source(commit)))
    lines: list[str] = []
    second = await builder.build(BuildRequest(repo.source(commit), log_sink=lines.append))

    assert second.digest == first.digest
    assert second.location == first.location
    assert second.cache.artifact_hit is True
    assert first.cache.artifact_hit is False
    assert _runs(tmp_path / "build-runs") == 1
    assert _runs(tmp_path / "deps-runs") == 1
    assert any("cache hit" in line for line in lines)
    assert second.cache.dependencies_key == first.cache.dependencies_key
    assert second.cache.durations_ms.keys() == {"fetch", "total"}  # no checkout, no hashing


async def test_another_commit_with_the_same_tree_is_a_hit(
    repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    commit = _python_app(repo, tmp_path)
    builder = LocalBuilder(data_dir)
    first = await builder.build(BuildRequest(repo.source(commit)))
    empty = repo.commit("empty", allow_empty=True)
    second = await builder.build(BuildRequest(repo.source(empty)))
    assert second.cache.artifact_hit
    assert second.commit == empty
    assert second.digest == first.digest
    assert _runs(tmp_path / "build-runs") == 1


async def test_a_new_builder_on_the_same_data_dir_hits_too(
    repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    commit = _python_app(repo, tmp_path)
    await LocalBuilder(data_dir).build(BuildRequest(repo.source(commit)))
    again = await LocalBuilder(data_dir).build(BuildRequest(repo.source(commit)))
    assert again.cache.artifact_hit


async def test_a_different_builder_configuration_is_a_miss(
    repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    commit = _python_app(repo, tmp_path)
    await LocalBuilder(data_dir).build(BuildRequest(repo.source(commit)))
    other = LocalBuilder(data_dir, LocalBuilderConfig(path="/usr/bin:/bin"))
    again = await other.build(BuildRequest(repo.source(commit)))
    assert not again.cache.artifact_hit
    assert _runs(tmp_path / "build-runs") == 2


async def test_hit_is_dropped_when_the_artifact_was_removed(
    repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    commit = _python_app(repo, tmp_path)
    builder = LocalBuilder(data_dir)
    first = await builder.build(BuildRequest(repo.source(commit)))
    _remove(Path(first.location))
    again = await builder.build(BuildRequest(repo.source(commit)))
    assert not again.cache.artifact_hit
    assert again.digest == first.digest
    verify_artifact(Path(again.location), again.digest)


def _remove(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o700)
    shutil.rmtree(path)


async def test_dependencies_are_reused_when_only_the_source_changes(
    repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    commit = _python_app(repo, tmp_path)
    builder = LocalBuilder(data_dir)
    cold = await builder.build(BuildRequest(repo.source(commit)))
    repo.write("app.py", "print('v2')\n")
    changed = repo.commit("source only")
    warm = await builder.build(BuildRequest(repo.source(changed)))

    assert cold.cache.dependencies_hit is False
    assert warm.cache.dependencies_hit is True
    assert warm.cache.artifact_hit is False
    assert warm.digest != cold.digest
    assert _runs(tmp_path / "deps-runs") == 1
    assert _runs(tmp_path / "build-runs") == 2
    out = Path(warm.location)
    assert (out / ".deps" / "installed.txt").read_text() == "requests==2.0\n"
    assert (out / "bundled.txt").read_text() == "requests==2.0\n"  # deps were there for the build
    assert (out / "app.py").read_text() == "print('v2')\n"
    assert warm.cache.dependencies_bytes > 0


async def test_dependencies_are_rebuilt_when_requirements_change(
    repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    commit = _python_app(repo, tmp_path)
    builder = LocalBuilder(data_dir)
    cold = await builder.build(BuildRequest(repo.source(commit)))
    repo.write("requirements.txt", "requests==2.1\n")
    bumped = repo.commit("bump requests")
    again = await builder.build(BuildRequest(repo.source(bumped)))

    assert again.cache.dependencies_hit is False
    assert again.cache.dependencies_key != cold.cache.dependencies_key
    assert _runs(tmp_path / "deps-runs") == 2
    assert (Path(again.location) / ".deps" / "installed.txt").read_text() == "requests==2.1\n"


async def test_dependencies_are_rebuilt_when_the_command_changes(
    repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    commit = _python_app(repo, tmp_path)
    builder = LocalBuilder(data_dir)
    await builder.build(BuildRequest(repo.source(commit)))
    text = (repo.path / "shipyard.toml").read_text().replace("echo installed", "echo done")
    repo.write("shipyard.toml", text)
    again = await builder.build(BuildRequest(repo.source(repo.commit("new deps command"))))
    assert again.cache.dependencies_hit is False


async def test_explicit_cache_key_files(repo: GitRepo, data_dir: Path, tmp_path: Path) -> None:
    counter = tmp_path / "deps-runs"
    repo.write("deps/list.txt", "a\n")
    repo.write("notes.txt", "1\n")
    repo.write(
        "shipyard.toml",
        manifest(
            'cache_key_files = ["deps/*.txt"]\n'
            f"dependencies = \"sh -c 'echo run >> {counter}; mkdir -p vendor; "
            "cp deps/list.txt vendor/'\""
        ),
    )
    builder = LocalBuilder(data_dir)
    await builder.build(BuildRequest(repo.source(repo.commit("keyed"))))
    repo.write("notes.txt", "2\n")  # not a key file
    warm = await builder.build(BuildRequest(repo.source(repo.commit("notes"))))
    assert warm.cache.dependencies_hit is True
    repo.write("deps/list.txt", "b\n")
    cold = await builder.build(BuildRequest(repo.source(repo.commit("key changed"))))
    assert cold.cache.dependencies_hit is False
    assert (Path(cold.location) / "vendor" / "list.txt").read_text() == "b\n"
    assert _runs(counter) == 2


async def test_dependency_step_sees_only_the_key_files(
    repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    listing = tmp_path / "listing"
    repo.write("requirements.txt", "x\n")
    repo.write("shipyard.toml", manifest(f"dependencies = \"sh -c 'ls -A > {listing}'\""))
    await LocalBuilder(data_dir).build(BuildRequest(repo.source(repo.commit("deps"))))
    assert listing.read_text().split() == ["requirements.txt"]


async def test_failing_dependency_step(repo: GitRepo, data_dir: Path) -> None:
    repo.write("requirements.txt", "x\n")
    repo.write("shipyard.toml", manifest("dependencies = \"sh -c 'echo no index; exit 7'\""))
    with pytest.raises(BuildFailed, match="dependency command exited with code 7"):
        await LocalBuilder(data_dir).build(BuildRequest(repo.source(repo.commit("deps"))))
    assert list((data_dir / "cache" / "deps").iterdir()) == []  # failures are not cached


async def test_dependency_output_colliding_with_the_source_fails(
    repo: GitRepo, data_dir: Path
) -> None:
    repo.write("requirements.txt", "x\n")
    repo.write("shipyard.toml", manifest("dependencies = \"sh -c 'echo dep > app.py'\""))
    with pytest.raises(BuildFailed, match=r"produced app\.py, which the commit also contains"):
        await LocalBuilder(data_dir).build(BuildRequest(repo.source(repo.commit("collide"))))


async def test_dependency_entries_are_read_only(
    repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    commit = _python_app(repo, tmp_path)
    artifact = await LocalBuilder(data_dir).build(BuildRequest(repo.source(commit)))
    assert artifact.cache.dependencies_key is not None
    entry = data_dir / "cache" / "deps" / artifact.cache.dependencies_key
    mode = stat.S_IMODE((entry / ".deps" / "installed.txt").stat().st_mode)
    assert not mode & 0o222


async def test_hardlinked_dependencies_modified_in_place_fail_and_are_dropped(
    repo: GitRepo, data_dir: Path
) -> None:
    repo.write("requirements.txt", "x\n")
    repo.write(
        "shipyard.toml",
        manifest(
            "dependencies = \"sh -c 'mkdir .deps; echo v1 > .deps/lib.txt'\"\n"
            "command = \"sh -c 'chmod u+w .deps/lib.txt; echo patched >> .deps/lib.txt'\""
        ),
    )
    builder = LocalBuilder(data_dir, LocalBuilderConfig(link_dependencies="hardlink"))
    with pytest.raises(BuildFailed, match=r"modified the cached dependency file \.deps/lib\.txt"):
        await builder.build(BuildRequest(repo.source(repo.commit("patching"))))
    assert [p for p in (data_dir / "cache" / "deps").iterdir() if not p.name.startswith(".")] == []


async def test_copied_dependencies_can_be_modified_without_touching_the_cache(
    repo: GitRepo, data_dir: Path
) -> None:
    repo.write("requirements.txt", "x\n")
    repo.write(
        "shipyard.toml",
        manifest(
            "dependencies = \"sh -c 'mkdir .deps; echo v1 > .deps/lib.txt'\"\n"
            "command = \"sh -c 'echo patched >> .deps/lib.txt'\""
        ),
    )
    builder = LocalBuilder(data_dir, LocalBuilderConfig(link_dependencies="copy"))
    artifact = await builder.build(BuildRequest(repo.source(repo.commit("p"))))
    assert artifact.cache.dependencies_key is not None
    entry = data_dir / "cache" / "deps" / artifact.cache.dependencies_key
    assert (entry / ".deps" / "lib.txt").read_text() == "v1\n"
    assert (Path(artifact.location) / ".deps" / "lib.txt").read_text() == "v1\npatched\n"


# --- eviction ---------------------------------------------------------------------------------


def _sized_app(repo: GitRepo, version: int, size: int) -> str:
    repo.write("requirements.txt", f"pkg=={version}\n")
    repo.write(
        "shipyard.toml",
        manifest(f"dependencies = \"sh -c 'mkdir .deps; head -c {size} /dev/zero > .deps/blob'\""),
    )
    return repo.commit(f"v{version}")


async def test_dependency_entries_are_evicted_least_recently_used_first(
    repo: GitRepo, data_dir: Path
) -> None:
    # Room for two 40 kB entries, not three.
    builder = LocalBuilder(data_dir, LocalBuilderConfig(cache_max_bytes=100_000))
    keys: list[str] = []
    commits = [_sized_app(repo, v, 40_000) for v in (1, 2)]
    for commit in commits:
        built = await builder.build(BuildRequest(repo.source(commit)))
        assert built.cache.evicted_entries == 0
        assert built.cache.dependencies_key is not None
        keys.append(built.cache.dependencies_key)

    # Use v1's dependencies again (a source-only change), so v2's are now the oldest.
    repo.write("app.py", "print('v1 again')\n")
    repo.write("requirements.txt", "pkg==1\n")
    reuse = await builder.build(BuildRequest(repo.source(repo.commit("v1 source change"))))
    assert reuse.cache.dependencies_hit is True

    third = await builder.build(BuildRequest(repo.source(_sized_app(repo, 3, 40_000))))
    assert third.cache.evicted_entries == 1
    deps = data_dir / "cache" / "deps"
    assert (deps / keys[0]).is_dir()  # recently used: kept
    assert not (deps / keys[1]).exists()  # least recently used: evicted
    assert third.cache.dependencies_key is not None
    assert (deps / third.cache.dependencies_key).is_dir()  # the one in use is never evicted
    assert third.cache.cache_bytes >= 80_000


async def test_artifacts_are_evicted_by_their_own_budget(repo: GitRepo, data_dir: Path) -> None:
    builder = LocalBuilder(data_dir, LocalBuilderConfig(artifacts_max_bytes=60_000))
    first = await builder.build(BuildRequest(repo.source(_sized_app(repo, 1, 40_000))))
    second = await builder.build(BuildRequest(repo.source(_sized_app(repo, 2, 40_000))))
    assert second.cache.evicted_entries == 1
    assert not Path(first.location).exists()
    assert Path(second.location).is_dir()
    # Its index entry is dropped on lookup, so the old commit simply builds again.
    again = await builder.build(BuildRequest(repo.source(first.commit)))
    assert not again.cache.artifact_hit
    assert again.digest == first.digest
