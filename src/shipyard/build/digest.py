"""Content digests of directory artifacts: what "the exact digest that was built" means.

``digest_tree`` is called by the local builder when it seals an artifact; ``verify_artifact`` by
the deploy stage right before it runs one (only the exact digest that was built, scanned and
signed may be deployed), and by the local builder and its cache before they reuse a stored
artifact. Also re-exported from ``shipyard.build.local``.

The digest is ``sha256:<hex>`` over a canonical listing of the tree, walked depth-first with
entries sorted by their byte names: for every directory its relative path; for every regular file
its relative path, executable bit (the only mode bit that survives git, so making an artifact
read-only does not change it), size and SHA-256 of its content; for every symlink its relative
path and target (links are never followed). Timestamps, owners and the other mode bits are not
part of it. Fields are NUL-separated, so no two different trees share a listing. Anything else
(FIFOs, sockets, devices) is refused.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from shipyard.errors import ArtifactVerificationFailed

DIGEST_PREFIX = "sha256:"
_FORMAT = b"shipyard-tree-v1\0"
_READ = 1 << 20


class UnsupportedEntry(ValueError):
    """The tree holds something that is not a directory, regular file or symlink."""


def digest_tree(path: Path) -> str:
    """``sha256:<hex>`` of the directory tree at ``path`` (deterministic; see module docstring)."""
    h = hashlib.sha256(_FORMAT)
    for line in _listing(os.fsencode(path)):
        h.update(line)
    return DIGEST_PREFIX + h.hexdigest()


def verify_artifact(path: Path, digest: str) -> None:
    """Recompute the tree digest of ``path``; raise ``ArtifactVerificationFailed`` unless it is
    exactly ``digest`` (a missing, modified, added or removed file all fail)."""
    if not path.is_dir():
        raise ArtifactVerificationFailed(
            f"artifact {digest} is missing: {path} is not a directory", digest=digest
        )
    try:
        actual = digest_tree(path)
    except (OSError, UnsupportedEntry) as exc:
        raise ArtifactVerificationFailed(
            f"artifact {digest} at {path} cannot be read: {exc}", digest=digest
        ) from exc
    if actual != digest:
        raise ArtifactVerificationFailed(
            f"artifact at {path} has digest {actual}, expected {digest}: it was modified after "
            "the build; rebuild it (deploying the commit again rebuilds it, `shipyard deploy "
            "--rebuild` forces a fresh build)",
            digest=digest,
            actual=actual,
        )


def artifact_dirname(digest: str) -> str:
    """``sha256:<hex>`` -> ``sha256-<hex>`` (a file name)."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return f"{algo}-{hexpart}"


def tree_size(path: Path) -> int:
    """Bytes of regular files under ``path`` (hard links counted once), for cache accounting."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def walk(root: bytes) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
    """(path relative to ``root``, full path, its lstat) of every entry under ``root``, in the
    digest's order: sorted byte names, depth-first, a directory before what it holds. Whatever
    must match the digest entry for entry walks with this (``build/archive.stream_tree``)."""
    stack: list[bytes] = [b""]
    while stack:
        rel = stack.pop()
        here = os.path.join(root, rel) if rel else root
        with os.scandir(here) as it:
            names = sorted(entry.name for entry in it)
        subdirs: list[bytes] = []
        for name in names:
            relpath = os.path.join(rel, name) if rel else name
            full = os.path.join(root, relpath)
            st = os.lstat(full)
            yield relpath, full, st
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(relpath)
        # Depth-first in sorted order: push in reverse so the smallest name is visited first.
        stack.extend(reversed(subdirs))


def _listing(root: bytes) -> Iterator[bytes]:
    for relpath, full, st in walk(root):
        if stat.S_ISDIR(st.st_mode):
            yield b"d\0" + relpath + b"\0"
        elif stat.S_ISREG(st.st_mode):
            mode = b"x" if st.st_mode & stat.S_IXUSR else b"-"
            yield b"f\0" + relpath + b"\0" + mode + b"\0" + _file_digest(full)
        elif stat.S_ISLNK(st.st_mode):
            yield b"l\0" + relpath + b"\0" + os.readlink(full) + b"\0"
        else:
            raise UnsupportedEntry(
                f"{os.fsdecode(relpath)} is not a file, directory or symlink "
                f"(mode {stat.filemode(st.st_mode)})"
            )


def _file_digest(path: bytes) -> bytes:
    h = hashlib.sha256()
    read = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_READ):
            h.update(chunk)
            read += len(chunk)
    return str(read).encode() + b"\0" + h.hexdigest().encode() + b"\0"
