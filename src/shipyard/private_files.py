"""Secrets on disk: the one way Shipyard writes a file that only its owner may read.

Called for the API's token-signing key (``api/auth.py``), the artifact signing key
(``security/signing.py``) and the agent's token, address and state file (``agent/server.py``;
the state file holds the revisions' environments, which may carry credentials). It sits beside
``logs.py`` outside the layers of ``.importlinter`` because the edges (agent, api) and a middle
layer (security) all need it; it imports nothing of Shipyard but ``errors``.

What it guarantees, each against a way such files leak or rot:

- Never readable by anyone else, at any instant: the bytes go into a temporary file that
  ``os.open`` creates with mode 0600 (``O_CREAT | O_EXCL``: a file or symlink planted under its
  name is an error, never something we write through) and ``fchmod``s to exactly 0600 (the umask
  may only have narrowed it). No ``open(); chmod()`` window.
- Never half written: the temporary file is fsynced, then renamed over the destination
  (``write_private``) or hard-linked to it (``create_private``, which must not replace a key
  another process created first), and the directory is fsynced, so after a crash the path holds
  the old content or the new, never a prefix.
- Never through a symlink: ``O_NOFOLLOW`` on the temporary file, and a symlink at the destination
  is refused rather than replaced or followed.
- Only in a directory no one else can write: a directory writable by group or others (or owned
  by another user) lets them swap the file for theirs between our write and a later read, so it
  is refused with the ``chmod`` that fixes it.

Every step is relative to one descriptor of the directory, opened and checked once, so a
directory renamed or swapped for a symlink after the check is not the one written to.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from shipyard.errors import PrivateFileUnsafe

#: The only mode a private file ever has.
PRIVATE_MODE = 0o600

_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_private(path: Path, data: bytes | str) -> None:
    """Replace ``path``'s content with ``data`` atomically, as a 0600 file (created if missing).

    Raises PrivateFileUnsafe when the directory is writable by others or ``path`` is a symlink.
    """
    dir_fd = _open_checked_dir(path.parent)
    try:
        _refuse_symlink(path, dir_fd)
        tmp = _write_temp(path.name, _as_bytes(data), dir_fd)
        try:
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def create_private(path: Path, data: bytes | str) -> bool:
    """Create ``path`` holding ``data`` as a 0600 file, unless it exists: True if this call
    created it. Two processes racing agree on one file (the loser's data is discarded), and
    nobody ever sees it partly written.

    Raises PrivateFileUnsafe when the directory is writable by others or ``path`` is a symlink.
    """
    dir_fd = _open_checked_dir(path.parent)
    try:
        tmp = _write_temp(path.name, _as_bytes(data), dir_fd)
        try:
            # link() never replaces: an existing name (file or symlink) is FileExistsError.
            os.link(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            created = True
        except FileExistsError:
            created = False
        finally:
            os.unlink(tmp, dir_fd=dir_fd)
        if not created:
            _refuse_symlink(path, dir_fd)
        os.fsync(dir_fd)
        return created
    finally:
        os.close(dir_fd)


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else data


def _open_checked_dir(directory: Path) -> int:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise PrivateFileUnsafe(
            f"cannot open directory {directory} for a private file: {exc.strerror or exc}",
            path=str(directory),
        ) from exc
    try:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            raise PrivateFileUnsafe(
                f"directory {directory} is writable by group or others (mode {mode:o}), so "
                f"they could replace a secret kept in it; run `chmod go-w {directory}`",
                path=str(directory),
            )
        if st.st_uid != os.geteuid():
            raise PrivateFileUnsafe(
                f"directory {directory} belongs to uid {st.st_uid}, not to this process "
                f"(uid {os.geteuid()}), so its owner could replace a secret kept in it; keep "
                "Shipyard's data directory owned by the user that runs it",
                path=str(directory),
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refuse_symlink(path: Path, dir_fd: int) -> None:
    try:
        st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise PrivateFileUnsafe(
            f"{path} is a symlink; a secret is never written through one (it could point "
            f"anywhere); remove it and try again",
            path=str(path),
        )


def _write_temp(name: str, data: bytes, dir_fd: int) -> str:
    """A fully written, fsynced 0600 file beside ``name``; returns its name in ``dir_fd``."""
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, _TEMP_FLAGS, PRIVATE_MODE, dir_fd=dir_fd)
    try:
        # The umask can only have removed bits (e.g. 0o400 under umask 0o277): make it exact.
        os.fchmod(fd, PRIVATE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.close(fd)
    return tmp


#: Logs: the owner writes, its group (operators) reads, nobody else.
LOG_MODE = 0o640
#: The data directory and the directories of secrets in it.
DIR_MODE = 0o700


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it ``0700``: the data directory holds
    keys, tokens, the database and the audit trail. Called by ``shipyard serve`` / ``agent``."""
    path.mkdir(parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != DIR_MODE:
        path.chmod(DIR_MODE)
    return path


def open_log(path: Path) -> int:
    """A descriptor appending to the log file ``path``, mode ``0640`` (created so, or narrowed
    to it), never through a symlink. For build logs, deployment logs and replica logs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(
        path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, LOG_MODE
    )
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != LOG_MODE:
            os.fchmod(fd, LOG_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd
