"""The build cache: no-op rebuilds, the cargo-chef dependency layer, and LRU eviction.

"Did the command run?" is proven by counter files the commands append to at absolute paths
outside the build (which also shows what the escape check does not cover: absolute paths).
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from shipyard.build.base import BuildRequest
from shipyard.build.cache import BuildCache
from shipyard.build.digest import digest_tree
from shipyard.build.local import (
    LocalBuilder,
    LocalBuilderConfig,
    _dependency_key,
    verify_artifact,
)
from shipyard.errors import BuildFailed
from shipyard.sandbox import Sandbox, SandboxPolicy

from .helpers import GitRepo, manifest


def _runs(data_dir: Path, what: str) -> int:
    """How many times the ``what`` ("build" or "dependency") command ran in ``data_dir``'s
    builds, from the build logs (a sandboxed command cannot leave a counter outside its tree)."""
    note = f"[shipyard] {what} command: "
    return sum(
        line.startswith(note)
        for log in (data_dir / "logs").glob("*.log")
        for line in log.read_text().splitlines()
    )


def _python_app(repo: GitRepo, tmp_path: Path, *, requirements: str = "requests==2.0\n") -> str:
    """An app whose dependency step 'installs' requirements.txt into .deps and counts itself."""
    repo.write("requirements.txt", requirements)
    repo.write(
        "shipyard.toml",
        manifest(
            "dependencies = \"sh -c 'mkdir -p .deps; "
            "cp requirements.txt .deps/installed.txt; echo installed'\"\n"
            "command = \"sh -c 'cat .deps/installed.txt "
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
    assert _runs(data_dir, "build") == 1
    assert _runs(data_dir, "dependency") == 1
    assert any("cache hit" in line for line in lines)
    assert second.cache.dependencies_key == first.cache.dependencies_key
    # No checkout, no command: only the stored artifact is re-hashed ("verify").
    assert second.cache.durations_ms.keys() == {"fetch", "verify", "total"}
    assert second.cache.artifact_rejected is None


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
    assert _runs(data_dir, "build") == 1


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
    assert _runs(data_dir, "build") == 2


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
    assert _runs(data_dir, "dependency") == 1
    assert _runs(data_dir, "build") == 2
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
    assert _runs(data_dir, "dependency") == 2
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
    repo.write("deps/list.txt", "a\n")
    repo.write("notes.txt", "1\n")
    repo.write(
        "shipyard.toml",
        manifest(
            'cache_key_files = ["deps/*.txt"]\n'
            "dependencies = \"sh -c 'mkdir -p vendor; "
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
    assert _runs(data_dir, "dependency") == 2


async def test_dependency_step_sees_only_the_key_files(
    repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    repo.write("requirements.txt", "x\n")
    repo.write("shipyard.toml", manifest('dependencies = "ls -A"'))
    lines: list[str] = []
    source = repo.source(repo.commit("deps"))
    await LocalBuilder(data_dir).build(BuildRequest(source, log_sink=lines.append))
    start = lines.index("[shipyard] dependency command: ls -A")
    assert lines[start + 1 : start + 2] == ["requirements.txt"]
    assert lines[start + 2].startswith("[shipyard] ")


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


@pytest.mark.skipif(os.geteuid() != 0, reason="uids are per service only when root")
async def test_sandboxed_builds_cannot_modify_hardlinked_dependencies_in_place(
    repo: GitRepo, data_dir: Path
) -> None:
    """The cache entry's files stay the server's: the build's uid may not change them at all."""
    repo.write("requirements.txt", "x\n")
    repo.write(
        "shipyard.toml",
        manifest(
            "dependencies = \"sh -c 'mkdir .deps; echo v1 > .deps/lib.txt'\"\n"
            "command = \"sh -c 'chmod u+w .deps/lib.txt; echo patched >> .deps/lib.txt'\""
        ),
    )
    builder = LocalBuilder(data_dir, LocalBuilderConfig(link_dependencies="hardlink"))
    with pytest.raises(BuildFailed, match=r"(?s)exited with code.*Permission denied"):
        await builder.build(BuildRequest(repo.source(repo.commit("patching"))))
    [entry] = [p for p in (data_dir / "cache" / "deps").iterdir() if p.is_dir()]
    assert (entry / ".deps" / "lib.txt").read_text() == "v1\n"


async def test_hardlinked_dependencies_modified_in_place_fail_and_are_dropped(
    repo: GitRepo, data_dir: Path
) -> None:
    """Without a sandbox (``--insecure-no-sandbox``) a build may edit them: that is caught."""
    repo.write("requirements.txt", "x\n")
    repo.write(
        "shipyard.toml",
        manifest(
            "dependencies = \"sh -c 'mkdir .deps; echo v1 > .deps/lib.txt'\"\n"
            "command = \"sh -c 'chmod u+w .deps/lib.txt; echo patched >> .deps/lib.txt'\""
        ),
    )
    insecure = Sandbox(SandboxPolicy(data_dir, insecure=True))
    builder = LocalBuilder(
        data_dir, LocalBuilderConfig(link_dependencies="hardlink"), sandbox=insecure
    )
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


# --- a cached artifact that no longer verifies; no_cache ------------------------------------


def _writable(path: Path) -> None:
    """Undo the seal the way an app might (root ignores it anyway: the tests may run as root)."""
    path.chmod(stat.S_IMODE(path.stat().st_mode) | stat.S_IWUSR)


def _add_pycache(artifact: Path) -> None:
    _writable(artifact)
    (artifact / "__pycache__").mkdir()
    (artifact / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\x00bytecode")


def _edit_dependency_in_place(artifact: Path) -> None:
    target = artifact / ".deps" / "installed.txt"
    _writable(target)
    with target.open("r+") as f:  # same inode: with hard links, the cache entry's file too
        f.write("evil")


def _add_fifo(artifact: Path) -> None:
    _writable(artifact)
    os.mkfifo(artifact / "pipe")


TAMPERINGS: dict[str, tuple[Callable[[Path], None], str]] = {
    "pycache-written": (_add_pycache, "modified after the build: it now hashes to sha256:"),
    "dependency-edited-in-place": (
        _edit_dependency_in_place,
        "modified after the build: it now hashes to sha256:",
    ),
    "unreadable-fifo": (_add_fifo, "cannot be read: pipe is not a file"),
}


@pytest.mark.parametrize("link", ["hardlink", "copy"])
@pytest.mark.parametrize("tampering", list(TAMPERINGS))
async def test_a_cached_artifact_that_does_not_verify_is_dropped_and_rebuilt(
    tampering: str, link: str, repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    tamper, reason = TAMPERINGS[tampering]
    commit = _python_app(repo, tmp_path)
    builder = LocalBuilder(data_dir, LocalBuilderConfig.model_validate({"link_dependencies": link}))
    first = await builder.build(BuildRequest(repo.source(commit)))
    tamper(Path(first.location))

    lines: list[str] = []
    again = await builder.build(BuildRequest(repo.source(commit), log_sink=lines.append))

    said = [line for line in lines if "failed verification" in line]
    assert len(said) == 1, lines
    assert said[0].startswith(f"[shipyard] cached artifact {first.digest} failed verification (")
    assert reason in said[0] and said[0].endswith("; rebuilding")
    assert not any(line.startswith("[shipyard] cache hit") for line in lines)
    assert again.cache.artifact_hit is False
    assert again.cache.artifact_rejected is not None and reason in again.cache.artifact_rejected
    # The same inputs build the same content again, and what is stored now is exactly that.
    assert again.digest == first.digest and again.location == first.location
    verify_artifact(Path(again.location), again.digest)
    assert (Path(again.location) / ".deps" / "installed.txt").read_text() == "requests==2.0\n"
    assert (Path(again.location) / "bundled.txt").read_text() == "requests==2.0\n"
    assert _runs(data_dir, "build") == 2
    # Hard-linked dependency files may have been edited through the artifact: that entry is
    # dropped and the step runs again; a copied entry cannot have been touched and is reused.
    assert _runs(data_dir, "dependency") == (2 if link == "hardlink" else 1)
    assert again.cache.dependencies_hit is (link == "copy")
    assert list((data_dir / "artifacts").glob(".trash-*")) == []
    # The index points at the fresh artifact again: the next build is a plain hit.
    third = await builder.build(BuildRequest(repo.source(commit)))
    assert third.cache.artifact_hit and third.cache.artifact_rejected is None
    assert _runs(data_dir, "build") == 2


async def test_no_cache_runs_every_step_again_and_replaces_the_dependency_entry(
    repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    commit = _python_app(repo, tmp_path)
    builder = LocalBuilder(data_dir)
    first = await builder.build(BuildRequest(repo.source(commit)))
    assert first.cache.dependencies_key is not None
    entry = data_dir / "cache" / "deps" / first.cache.dependencies_key
    entry_inode, artifact_inode = entry.stat().st_ino, Path(first.location).stat().st_ino

    lines: list[str] = []
    fresh = await builder.build(
        BuildRequest(repo.source(commit), log_sink=lines.append, no_cache=True)
    )

    assert fresh.cache.no_cache is True
    assert fresh.cache.artifact_hit is False and fresh.cache.dependencies_hit is False
    misses = [line for line in lines if "dependency cache miss" in line]
    assert len(misses) == 1 and "no_cache" in misses[0]
    assert lines.count("installed") == 1  # the dependency command's own output: it ran
    assert _runs(data_dir, "dependency") == 2 and _runs(data_dir, "build") == 2
    assert entry.stat().st_ino != entry_inode  # the entry is this build's output now
    # Same content: the stored artifact verified, so it was kept (an app may run from it).
    assert fresh.digest == first.digest
    assert Path(fresh.location).stat().st_ino == artifact_inode
    verify_artifact(Path(fresh.location), fresh.digest)
    # Still published and indexed: a normal build afterwards is a hit.
    again = await builder.build(BuildRequest(repo.source(commit)))
    assert again.cache.artifact_hit and again.cache.dependencies_key == fresh.cache.dependencies_key


async def test_no_cache_replaces_a_stored_artifact_that_does_not_verify(
    repo: GitRepo, data_dir: Path, tmp_path: Path
) -> None:
    commit = _python_app(repo, tmp_path)
    builder = LocalBuilder(data_dir)
    first = await builder.build(BuildRequest(repo.source(commit)))
    _add_pycache(Path(first.location))
    lines: list[str] = []
    fresh = await builder.build(
        BuildRequest(repo.source(commit), log_sink=lines.append, no_cache=True)
    )
    assert any(
        line.startswith(f"[shipyard] replaced the stored copy of {first.digest}") for line in lines
    ), lines
    assert not (Path(fresh.location) / "__pycache__").exists()
    verify_artifact(Path(fresh.location), fresh.digest)


def _sealed_tree(root: Path, text: str) -> tuple[Path, str]:
    root.mkdir(parents=True)
    (root / "app.py").write_text(text)
    return root, digest_tree(root)


def test_publish_keeps_a_stored_copy_that_verifies_and_replaces_one_that_does_not(
    data_dir: Path, tmp_path: Path
) -> None:
    cache = BuildCache(data_dir, max_bytes=10**9)
    tree, digest = _sealed_tree(tmp_path / "one", "print(1)\n")
    stored = cache.publish_artifact(tree, digest)
    assert stored.replaced is None and stored.size == len("print(1)\n")
    inode = stored.path.stat().st_ino

    same, _ = _sealed_tree(tmp_path / "two", "print(1)\n")
    kept = cache.publish_artifact(same, digest)
    assert kept.replaced is None and kept.path.stat().st_ino == inode
    assert not same.exists()  # the duplicate was dropped

    _writable(stored.path / "app.py")
    (stored.path / "app.py").write_text("print('changed')\n")
    fresh, _ = _sealed_tree(tmp_path / "three", "print(1)\n")
    replaced = cache.publish_artifact(fresh, digest)
    assert replaced.replaced is not None and "modified after the build" in replaced.replaced
    verify_artifact(replaced.path, digest)
    assert cache.artifact_bytes(digest) == len("print(1)\n")


def test_drop_artifact_leaves_one_that_verifies_now(data_dir: Path, tmp_path: Path) -> None:
    cache = BuildCache(data_dir, max_bytes=10**9)
    tree, digest = _sealed_tree(tmp_path / "one", "print(1)\n")
    stored = cache.publish_artifact(tree, digest)
    # A concurrent build already replaced it: nothing to drop.
    assert cache.drop_artifact(digest) is False and stored.path.is_dir()
    _writable(stored.path)
    (stored.path / "extra.txt").write_text("x")
    assert cache.drop_artifact(digest) is True
    assert not stored.path.exists() and cache.artifact_bytes(digest) == 0


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


def test_a_shell_dependency_step_is_keyed_by_the_program_its_script_runs(tmp_path: Path) -> None:
    """With shell = true the argv's program is /bin/sh; the interpreter the script starts (a
    python3 upgraded in place) must still key the entry, as it does for a plain command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "python3"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    argv = ["/bin/sh", "-c", "python3 -m venv .venv && .venv/bin/pip install -r r.txt"]
    before, _ = _dependency_key(tmp_path, [], argv, env)
    assert _dependency_key(tmp_path, [], argv, env)[0] == before
    tool.write_text("#!/bin/sh\n# a newer interpreter\n")
    assert _dependency_key(tmp_path, [], argv, env)[0] != before
