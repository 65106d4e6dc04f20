"""The local build cache: sealed artifacts, dependency environments, and the input index.

Used by the local builder (``local.py``); everything here is blocking file-system work that the
builder runs through ``asyncio.to_thread``. Layout under the data directory::

    artifacts/sha256-<hex>/            a sealed, read-only artifact tree (named by its digest)
    artifacts/sha256-<hex>.meta.json   its size; the file's mtime is its last use (LRU)
    cache/deps/<key>/                  a dependency step's output (cargo-chef's "cook" layer)
    cache/deps/<key>.meta.json
    cache/index/<key>.json             inputs (commit tree + build configuration) -> digest
    cache/lock                         flock held while publishing or evicting

``artifacts/`` may live elsewhere (``artifacts_dir``: ``serve --shared-dir``, where every
control-plane replica finds what any of them built, e.g. on NFS); then publishing and evicting
also hold ``<artifacts_dir>/.lock``, taken after ``cache/lock`` (one order, no deadlock), and a
tree built on another file system is copied in (``.incoming-*``, renamed once whole).

Why three parts: the input index makes a rebuild of already-built inputs a lookup plus one
verification hash of the stored tree (no checkout, no command); the dependency cache makes a
source-only change skip the expensive dependency step; the artifact store holds exactly one copy
of every digest. Dependency entries and artifacts are evicted least-recently-used first when
their byte budgets are exceeded; index entries whose artifact is gone are dropped on lookup.

A sealed artifact can still be changed on disk (by root, or by an app that made its directory
writable, e.g. to write ``__pycache__``). The builder verifies an index hit before reusing it and
calls ``drop_artifact`` when it does not verify; ``publish_artifact`` keeps an existing directory
for the digest only if it verifies, and replaces it otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipyard.build.digest import artifact_dirname, tree_size, verify_artifact
from shipyard.errors import ArtifactVerificationFailed

_META = ".meta.json"


@dataclass(frozen=True)
class IndexEntry:
    digest: str
    commit: str
    manifest: dict[str, Any]
    dependencies_key: str | None = None


@dataclass(frozen=True)
class Published:
    path: Path
    size: int
    #: Why the directory already stored for this digest was replaced (it did not verify).
    replaced: str | None = None


@dataclass(frozen=True)
class Eviction:
    evicted: int
    cache_bytes: int  # bytes held by dependency entries + artifacts after eviction


class BuildCache:
    """One data directory's cache. Safe to share between processes (publish/evict under flock)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        max_bytes: int,
        artifacts_max_bytes: int | None = None,
        artifacts_dir: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.artifacts_dir = artifacts_dir or data_dir / "artifacts"
        self.deps_dir = data_dir / "cache" / "deps"
        self.index_dir = data_dir / "cache" / "index"
        self.max_bytes = max_bytes
        self.artifacts_max_bytes = artifacts_max_bytes
        for d in (self.artifacts_dir, self.deps_dir, self.index_dir):
            d.mkdir(parents=True, exist_ok=True)

    # --- input index ------------------------------------------------------------------------

    def lookup_inputs(self, key: str) -> IndexEntry | None:
        """The artifact already built from these inputs, if it is still in the store."""
        path = self.index_dir / f"{key}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            entry = IndexEntry(
                digest=data["digest"],
                commit=data["commit"],
                manifest=data["manifest"],
                dependencies_key=data.get("dependencies_key"),
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):  # a torn or foreign file: rebuild
            path.unlink(missing_ok=True)
            return None
        if not self.artifact_path(entry.digest).is_dir():
            path.unlink(missing_ok=True)
            return None
        _touch(self._artifact_meta(entry.digest))
        return entry

    def record_inputs(self, key: str, entry: IndexEntry) -> None:
        data = {
            "digest": entry.digest,
            "commit": entry.commit,
            "manifest": entry.manifest,
            "dependencies_key": entry.dependencies_key,
        }
        _write_atomic(self.index_dir / f"{key}.json", json.dumps(data, sort_keys=True))

    # --- artifacts --------------------------------------------------------------------------

    def artifact_path(self, digest: str) -> Path:
        return self.artifacts_dir / artifact_dirname(digest)

    def artifact_bytes(self, digest: str) -> int:
        return _meta_size(self._artifact_meta(digest))

    def publish_artifact(self, tree: Path, digest: str) -> Published:
        """Move ``tree`` (already hashed to ``digest``) into the store, read-only.

        If a directory for ``digest`` is already there and verifies, it is kept and ``tree``
        dropped: same content, and a revision may be running from it. If it does not verify (it
        was modified after its build), it is replaced and ``Published.replaced`` says why.
        """
        dest = self.artifact_path(digest)
        meta = self._artifact_meta(digest)
        replaced = None
        with self._locked():
            if dest.is_dir():
                replaced = _verification_error(dest, digest)
                if replaced is None:
                    _remove_tree(tree)
                    if not meta.is_file():
                        _write_meta(meta, tree_size(dest))
                    _touch(meta)
                    return Published(dest, self.artifact_bytes(digest))
                meta.unlink(missing_ok=True)
                _remove_tree(dest)
            size = tree_size(tree)
            _move_in(tree, dest)  # before chmod: moving a directory needs it writable
            make_read_only(dest)
            _write_meta(meta, size)
            _touch(meta)
        return Published(dest, size, replaced)

    def drop_artifact(self, digest: str, inputs_key: str | None = None) -> bool:
        """Remove the artifact ``digest`` (and the index entry ``inputs_key``) if it still fails
        verification; False if it verifies now (a concurrent build already replaced it).

        Removal unlinks the files: a process running from the directory keeps its open files
        only. Callers drop an artifact only after it failed verification, when it can no longer
        be deployed, restarted or rolled back to anyway.
        """
        dest = self.artifact_path(digest)
        with self._locked():
            if dest.is_dir() and _verification_error(dest, digest) is None:
                return False
            if inputs_key is not None:
                (self.index_dir / f"{inputs_key}.json").unlink(missing_ok=True)
            self._artifact_meta(digest).unlink(missing_ok=True)  # first: never half looked up
            _remove_tree(dest)
        return True

    def _artifact_meta(self, digest: str) -> Path:
        return self.artifacts_dir / (artifact_dirname(digest) + _META)

    # --- dependency entries -----------------------------------------------------------------

    def lookup_dependencies(self, key: str) -> Path | None:
        entry = self.deps_dir / key
        meta = self.deps_dir / (key + _META)
        if entry.is_dir() and meta.is_file():
            _touch(meta)
            return entry
        return None

    def dependencies_bytes(self, key: str) -> int:
        return _meta_size(self.deps_dir / (key + _META))

    def publish_dependencies(self, key: str, tree: Path, *, replace: bool = False) -> Path:
        """Move ``tree`` into the store as entry ``key``, read-only. An existing entry is kept
        (``tree`` dropped) unless ``replace`` (a no-cache build: its fresh output wins)."""
        entry = self.deps_dir / key
        meta = self.deps_dir / (key + _META)
        with self._locked():
            if entry.is_dir() and not replace:
                _remove_tree(tree)
            else:
                meta.unlink(missing_ok=True)
                _remove_tree(entry)  # hard-linked artifacts keep their own links to its files
                size = tree_size(tree)
                os.rename(tree, entry)
                make_read_only(entry)
                _write_meta(meta, size)
            _touch(meta)
        return entry

    def drop_dependencies(self, key: str) -> None:
        """Forget an entry that can no longer be trusted (a build modified it in place)."""
        with self._locked():
            (self.deps_dir / (key + _META)).unlink(missing_ok=True)
            if (self.deps_dir / key).is_dir():
                _remove_tree(self.deps_dir / key)

    # --- eviction ---------------------------------------------------------------------------

    def evict(self, *, keep: frozenset[Path] = frozenset()) -> Eviction:
        """Drop least-recently-used entries until each budget holds; never those in ``keep``
        (what the current build uses)."""
        evicted = 0
        with self._locked():
            deps = list(self._entries(self.deps_dir))
            evicted += _evict_lru(deps, self.max_bytes, keep)
            arts = list(self._entries(self.artifacts_dir))
            if self.artifacts_max_bytes is not None:
                evicted += _evict_lru(arts, self.artifacts_max_bytes, keep)
            total = sum(e.size for e in deps + arts if e.path.exists())
        return Eviction(evicted=evicted, cache_bytes=total)

    def _entries(self, parent: Path) -> Iterator[_Entry]:
        for meta in parent.glob("*" + _META):
            path = parent / meta.name.removesuffix(_META)
            try:
                used = meta.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if path.is_dir():
                yield _Entry(path=path, meta=meta, size=_meta_size(meta), used=used)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        paths = [self.data_dir / "cache" / "lock"]
        if self.artifacts_dir != self.data_dir / "artifacts":  # shared with other replicas
            paths.append(self.artifacts_dir / ".lock")
        fds: list[int] = []
        try:
            for path in paths:
                fds.append(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
                fcntl.flock(fds[-1], fcntl.LOCK_EX)
            yield
        finally:
            for fd in reversed(fds):
                os.close(fd)


@dataclass(frozen=True)
class _Entry:
    path: Path
    meta: Path
    size: int
    used: int


def _evict_lru(entries: list[_Entry], budget: int, keep: frozenset[Path]) -> int:
    total = sum(e.size for e in entries)
    evicted = 0
    for entry in sorted(entries, key=lambda e: e.used):
        if total <= budget:
            break
        if entry.path in keep:
            continue
        entry.meta.unlink(missing_ok=True)  # first: a half-removed entry is never looked up
        _remove_tree(entry.path)
        total -= entry.size
        evicted += 1
    return evicted


_last_touch = 0


def _touch(meta: Path) -> None:
    # Strictly increasing use times, so LRU order is exact even within one clock tick.
    global _last_touch
    now = max(time.time_ns(), _last_touch + 1)
    _last_touch = now
    with contextlib.suppress(FileNotFoundError):
        os.utime(meta, ns=(now, now))


def _verification_error(path: Path, digest: str) -> str | None:
    try:
        verify_artifact(path, digest)
    except ArtifactVerificationFailed as exc:
        return exc.message
    return None


def _write_meta(meta: Path, size: int) -> None:
    _write_atomic(meta, json.dumps({"size": size}))


def _meta_size(meta: Path) -> int:
    try:
        return int(json.loads(meta.read_text(encoding="utf-8"))["size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def make_read_only(root: Path) -> None:
    """Clear every write bit (the executable bit, which the digest covers, is kept). Also
    called by ``agent.fetching`` on a fetched artifact before it enters the agent's cache."""
    _clear_write_tree(os.fspath(root))


def _clear_write_tree(path: str) -> None:
    with os.scandir(path) as it:
        for e in it:
            if e.is_symlink():
                continue
            if e.is_dir(follow_symlinks=False):
                _clear_write_tree(e.path)
            else:
                mode = stat.S_IMODE(e.stat(follow_symlinks=False).st_mode)
                if mode & 0o222:  # hard-linked dependency files are read-only already
                    os.chmod(e.path, mode & ~0o222)
    os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) & ~0o222)


def _move_in(tree: Path, dest: Path) -> None:
    """Rename ``tree`` to ``dest``; across file systems (a shared artifact store on another
    mount), copy it beside ``dest`` first (links, modes and times kept: the digest covers the
    executable bit and symlinks) and rename the whole copy, so ``dest`` never exists half."""
    try:
        os.rename(tree, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    incoming = dest.with_name(f".incoming-{uuid.uuid4().hex}")
    try:
        shutil.copytree(tree, incoming, symlinks=True)
        os.rename(incoming, dest)
    except BaseException:
        _remove_tree(incoming)
        raise
    _remove_tree(tree)


def _remove_tree(path: Path) -> None:
    """Remove a (possibly read-only) tree: renamed away first so it vanishes atomically."""
    trash = path.with_name(f".trash-{uuid.uuid4().hex}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    make_removable(trash)
    shutil.rmtree(trash, ignore_errors=True)


def make_removable(root: Path) -> None:
    """Give the owner write access to every directory under ``root`` so it can be deleted."""
    os.chmod(root, stat.S_IRWXU)
    for dirpath, dirs, _files in os.walk(root):
        for name in dirs:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, stat.S_IMODE(os.lstat(p).st_mode) | stat.S_IRWXU)
