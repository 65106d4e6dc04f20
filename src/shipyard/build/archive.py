"""Directory artifacts as tar streams: the control plane serves one (``stream_tree``) and a
joined agent on another host unpacks it (``extract_tree``) into a tree that hashes to the same
digest (``build.digest``).

Callers: ``api.fleet_artifacts`` streams a recorded artifact to an agent over the fleet
listener; ``agent.fetching.ArtifactFetcher`` extracts it into the agent's cache and then verifies
the digest. Both halves live here, under the layers both may import, so that what is written and
what is accepted are read side by side.

What is written is exactly what the digest covers: directories, regular files (mode 0755 when
the owner's executable bit is set, else 0644: the only mode bit the digest keeps) and symlinks
with their targets verbatim; timestamps, owners and names of owners are zero/empty, so the same
tree always gives the same bytes. The tar is built on the fly, one bounded chunk at a time (a
1 GB file is never held in memory), optionally gzip-compressed.

What is accepted is hostile until proven otherwise (the fetch could come from a compromised or
impersonated control plane, and the digest is checked only after extraction), so the stream is
read member by member (``tarfile`` stream mode) and refused (``UnsafeArchive``, nothing of it is
kept by the caller) on: an absolute name, a ``..`` component, a NUL, a name seen twice, an entry
whose parent is not a directory listed before it, a hard link, a device, FIFO or anything that is
not a directory, regular file or symlink, a symlink that leaves the tree (absolute, or relative
and resolving outside it, also through other links) except a virtualenv's ``bin/python*`` link to
its base interpreter (the one absolute link the local builder lets into an artifact,
``build.venvs.interpreter_link``), more entries or more bytes than ``ExtractLimits`` allow. Files
are created with ``O_EXCL | O_NOFOLLOW`` below directories this function made itself, so nothing
is ever written through a link. The rules follow ``security/rootfs.py``'s extraction of image
metadata (same name rules), stricter where links are created rather than skipped.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, cast

from shipyard.build.digest import walk
from shipyard.domain.tar_names import MAX_NAME_CHARS, safe_name

#: Bytes per read of a file (into the stream, or out of it into a new file).
CHUNK = 1 << 16
#: Bytes per chunk of a streamed tar: a server iterates the stream in a worker thread, one
#: thread hop per chunk, so fewer and larger than file reads; still small beside a fetch's
#: memory (the agent keeps at most 8 batches of 256 KiB queued).
STREAM_CHUNK = 1 << 18
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_INTERPRETER = re.compile(r"^(?:.*/)?bin/python[0-9.]*$")


class UnsafeArchive(ValueError):
    """The tar holds something an artifact may not (see module docstring); ``reason`` is a
    stable machine word (``unsafe_path``, ``hard_link``, ``special_file``, ``link_escapes``,
    ``duplicate``, ``orphan``, ``too_large``, ``too_many_entries``, ``not_a_tar``)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on one extraction: bytes of file content and number of entries. The defaults
    are far above any Python service's artifact (the notes example: 480 entries, 8.2 MB) and
    far below what fills an agent's disk."""

    max_bytes: int = 2 << 30
    max_entries: int = 200_000

    @property
    def max_stream_bytes(self) -> int:
        """The most tar bytes a stream within the limits can take: content, one header and
        padding per entry (a long name takes a PAX header of its own), the end blocks."""
        return self.max_bytes + self.max_entries * 4 * _BLOCK + 2 * _RECORD


@dataclass(frozen=True)
class Extracted:
    """What ``extract_tree`` wrote."""

    entries: int
    bytes: int


class Readable(Protocol):
    """What ``extract_tree`` reads from: ``read(n)`` returns up to ``n`` bytes, b"" at the end."""

    def read(self, size: int = -1, /) -> bytes: ...


# --- serving ----------------------------------------------------------------------------------


def stream_tree(root: Path, *, gzip_level: int | None = None) -> Iterator[bytes]:
    """The tree at ``root`` as a tar stream, in chunks of about ``STREAM_CHUNK`` bytes
    (gzip-compressed when ``gzip_level`` is given). Blocking reads: a server iterates it in a
    worker thread (Starlette does so for a sync iterator). A FIFO or socket in the tree, or a
    file changed while streamed, raises ``OSError``: the stream then ends short and the reader
    fails rather than getting a tree that is not the one recorded."""
    if gzip_level is None:
        yield from _tar_chunks(root)
        return
    z = zlib.compressobj(gzip_level, zlib.DEFLATED, 31)  # 31: gzip framing
    for chunk in _tar_chunks(root):
        out = z.compress(chunk)
        if out:
            yield out
    yield z.flush()


def _tar_chunks(root: Path) -> Iterator[bytes]:
    buf = bytearray()
    written = 0
    for header, path, size in _entries(os.fsencode(root)):
        buf += header
        if path is not None:
            for chunk in _file_chunks(path, size):
                buf += chunk
                if len(buf) >= STREAM_CHUNK:
                    written += len(buf)
                    yield bytes(buf)
                    buf.clear()
            buf += b"\0" * (-size % _BLOCK)
        if len(buf) >= STREAM_CHUNK:
            written += len(buf)
            yield bytes(buf)
            buf.clear()
    buf += b"\0" * (2 * _BLOCK)
    # Pad to a whole record as tar(1) writes it, so `tar x` reads it without a warning.
    buf += b"\0" * (-(written + len(buf)) % _RECORD)
    yield bytes(buf)


def _entries(root: bytes) -> Iterator[tuple[bytes, bytes | None, int]]:
    """(tar header, file to append or None, its size) for every entry, parents first, in the
    digest's order (``digest.walk``)."""
    for relpath, full, st in walk(root):
        info = tarfile.TarInfo(os.fsdecode(relpath))
        info.mtime = 0
        if stat.S_ISDIR(st.st_mode):
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            yield _header(info), None, 0
        elif stat.S_ISREG(st.st_mode):
            info.mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
            info.size = st.st_size
            yield _header(info), full, st.st_size
        elif stat.S_ISLNK(st.st_mode):
            info.type, info.mode = tarfile.SYMTYPE, 0o777
            info.linkname = os.fsdecode(os.readlink(full))
            yield _header(info), None, 0
        else:
            raise OSError(f"{os.fsdecode(relpath)} is not a file, directory or symlink")


def _header(info: tarfile.TarInfo) -> bytes:
    # PAX: long names and non-ASCII names round-trip; surrogateescape keeps non-UTF-8 bytes.
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _file_chunks(path: bytes, size: int) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        left = size
        while left > 0:
            chunk = os.read(fd, min(CHUNK, left))
            if not chunk:
                raise OSError(f"{os.fsdecode(path)} shrank while it was being sent")
            left -= len(chunk)
            yield chunk
        if os.read(fd, 1):
            raise OSError(f"{os.fsdecode(path)} grew while it was being sent")
    finally:
        os.close(fd)


# --- extracting -------------------------------------------------------------------------------


def extract_tree(stream: Readable, dest: Path, limits: ExtractLimits | None = None) -> Extracted:
    """Read the tar ``stream`` to its end into ``dest`` (an existing empty directory the caller
    owns, and removes when this raises). ``UnsafeArchive`` on anything the module docstring
    refuses. Blocking: run it in a worker thread."""
    limits = limits or ExtractLimits()
    root = os.fspath(dest)
    kinds: dict[str, str] = {"": "d"}
    links: list[tuple[str, str]] = []
    entries = total = 0
    counted = _Counted(stream, limits.max_stream_bytes)
    try:
        with tarfile.open(fileobj=cast(IO[bytes], counted), mode="r|") as tar:
            for member in tar:
                entries += 1
                if entries > limits.max_entries:
                    raise UnsafeArchive(
                        f"the artifact has more than {limits.max_entries} entries",
                        "too_many_entries",
                    )
                if member.isdir() and member.name.strip("/") in ("", "."):
                    continue  # the root itself, as `tar -c .` writes it: dest is that
                name = safe_name(member.name)
                if name is None:
                    raise UnsafeArchive(
                        f"entry {member.name[:200]!r} is absolute or leaves the tree", "unsafe_path"
                    )
                if name in kinds:
                    raise UnsafeArchive(f"entry {name} appears twice", "duplicate")
                parent = posixpath.dirname(name)
                if kinds.get(parent) != "d":
                    raise UnsafeArchive(
                        f"entry {name}: its parent {parent} is not a directory listed before it",
                        "orphan",
                    )
                target = os.path.join(root, name)
                if member.isdir():
                    os.mkdir(target, 0o755)
                    kinds[name] = "d"
                elif member.isreg():
                    total += member.size
                    if total > limits.max_bytes:
                        raise UnsafeArchive(
                            f"the artifact holds more than {limits.max_bytes} bytes",
                            "too_large",
                        )
                    source = tar.extractfile(member)
                    if source is None:  # pragma: no cover - a regular member always has one
                        raise UnsafeArchive(f"entry {name} cannot be read", "not_a_tar")
                    _write(source, target, member.size, executable=bool(member.mode & 0o100))
                    kinds[name] = "f"
                elif member.issym():
                    _check_link_text(name, member.linkname)
                    os.symlink(member.linkname, target)
                    kinds[name] = "l:" + member.linkname
                    links.append((name, member.linkname))
                elif member.islnk():
                    raise UnsafeArchive(
                        f"entry {name} is a hard link (to {member.linkname[:200]}); an artifact "
                        "holds none",
                        "hard_link",
                    )
                else:
                    raise UnsafeArchive(
                        f"entry {name} is a device, FIFO or other special file; an artifact "
                        "holds only directories, regular files and symlinks",
                        "special_file",
                    )
    except tarfile.TarError as exc:
        raise UnsafeArchive(f"the artifact is not a readable tar: {exc}", "not_a_tar") from exc
    for name, text in links:
        _check_link_resolves(name, text, kinds)
    return Extracted(entries=entries, bytes=total)


class _Counted:
    """Bounds the raw tar bytes read (a PAX header is read into memory whole: an endless one
    must end in a refusal, not in the agent's memory)."""

    def __init__(self, stream: Readable, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self.read_bytes = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self._stream.read(size)
        self.read_bytes += len(data)
        if self.read_bytes > self._limit:
            raise UnsafeArchive(
                f"the artifact's tar stream is longer than {self._limit} bytes", "too_large"
            )
        return data


def _write(source: IO[bytes], target: str, size: int, *, executable: bool) -> None:
    """Exactly ``size`` bytes into a new regular file, never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(target, flags, 0o600)
    try:
        left = size
        while left > 0:
            chunk = source.read(min(CHUNK, left))
            if not chunk:
                raise UnsafeArchive(f"the tar stream ended inside {target}", "not_a_tar")
            os.write(fd, chunk)
            left -= len(chunk)
        os.fchmod(fd, 0o755 if executable else 0o644)
    finally:
        os.close(fd)


def _is_interpreter_link(name: str, text: str) -> bool:
    return text.startswith("/") and _INTERPRETER.match(name) is not None


def _check_link_text(name: str, text: str) -> None:
    """Refuse, before it is made, a link whose text alone leaves the tree."""
    if not text or "\x00" in text or len(text) > MAX_NAME_CHARS:
        raise UnsafeArchive(f"symlink {name} has an unusable target", "link_escapes")
    if _is_interpreter_link(name, text):
        return  # checked once the whole tree is there (its pyvenv.cfg may come later)
    inside = posixpath.normpath(posixpath.join(posixpath.dirname(name), text))
    if text.startswith("/") or inside == ".." or inside.startswith("../"):
        raise UnsafeArchive(
            f"symlink {name} -> {text[:200]} points outside the artifact", "link_escapes"
        )


def _check_link_resolves(name: str, text: str, kinds: dict[str, str]) -> None:
    """After extraction: an absolute link only as a venv's interpreter (``<venv>/bin/python*``
    beside ``<venv>/pyvenv.cfg``); a relative one must resolve inside the tree, following the
    tree's own links (``a -> d/up/..`` with ``d/up -> ..`` leaves it; ``bin/python3 -> python``
    with ``python -> /usr/bin/python3`` is the venv's interpreter, as ``venv`` lays it out)."""
    if _is_interpreter_link(name, text):
        venv = posixpath.dirname(posixpath.dirname(name))
        if kinds.get(posixpath.join(venv, "pyvenv.cfg") if venv else "pyvenv.cfg") != "f":
            raise UnsafeArchive(
                f"symlink {name} -> {text[:200]} points outside the artifact and is not a "
                "virtualenv's interpreter",
                "link_escapes",
            )
        return
    if not _resolves_inside(name, kinds):
        raise UnsafeArchive(
            f"symlink {name} -> {text[:200]} resolves outside the artifact", "link_escapes"
        )


def _resolves_inside(name: str, kinds: dict[str, str]) -> bool:
    """Whether the link ``name`` resolves inside the tree, walking its target component by
    component as the kernel does (``..`` applies to the resolved path) with the tree's links
    (``kinds`` values ``l:<text>``); a missing component is a dangling name, still inside."""
    resolved: list[str] = []
    # A stack: the next component last.
    pending = [*posixpath.dirname(name).split("/"), *kinds[name][2:].split("/")][::-1]
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                return False
            resolved.pop()
            continue
        resolved.append(part)
        kind = kinds.get("/".join(resolved), "")
        if not kind.startswith("l:"):
            continue
        hops += 1
        if hops > 40:  # a loop (ELOOP): it resolves nowhere, so nowhere outside either
            return True
        text = kind[2:]
        if text.startswith("/"):
            # Only a venv's interpreter link is absolute (checked on its own); going on below
            # it (``bin/python/x``) would be a path outside.
            return not pending or all(p in ("", ".") for p in pending)
        resolved.pop()
        pending.extend(reversed(text.split("/")))
    return True
