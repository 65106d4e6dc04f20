"""Virtualenvs inside an artifact: made relocatable when sealed, found when a replica starts.

A build runs in a scratch workspace (``<data>/builds/b-XXXX/src``, or the dependency step's
``.../recipe``) and its artifact is then moved to ``<data>/artifacts/sha256-<hex>``, where replicas
run it. ``python -m venv`` + ``pip install`` write that scratch path into every console script's
``#!`` line (``#!/.../b-XXXX/src/.venv/bin/python3``), so after the move ``gunicorn`` would point
at an interpreter that no longer exists. ``relocate`` (called by ``build.local`` on the dependency
step's output before it is cached, and on the workspace before it is hashed) rewrites those
lines to the form ``uv venv --relocatable`` writes: a ``/bin/sh`` line that execs the ``python``
beside the script, whatever directory the venv is in now, and that Python reads as a string::

    #!/bin/sh
    '''exec' "$(dirname -- "$(realpath -- "$0")")"/'python3' "$0" "$@"
    ' '''

A venv's own interpreter finds the venv from where it is (``pyvenv.cfg`` beside ``bin/``), so the
rest of the venv moves as it is. Its ``bin/python*`` are symlinks to the base interpreter
(``pyvenv.cfg``'s ``home``, e.g. ``/usr/bin/python3``) outside the artifact: the only absolute
links an artifact may hold (``interpreter_link``); one to a missing interpreter fails the build
with how to make a venv that works. ``.pth`` lines naming a path under the old workspace (``pip
install -e .``) become relative to their site-packages. ``bin/activate`` keeps the old path: a
replica does not need it (the supervisor puts ``venv_bins`` first on ``PATH`` and sets
``VIRTUAL_ENV``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PYVENV_CFG = "pyvenv.cfg"
#: How deep below the artifact root venvs are looked for (``.venv``, ``app/.venv``).
MAX_DEPTH = 2
_SHEBANG_MAX = 4096
#: distlib's form for interpreter paths too long for a ``#!`` line.
_LONG_FORM = re.compile(rb"^#!/bin/sh\n'''exec' \"?([^\"\n]+?)\"? \"\$0\" \"\$@\"\n' '''\n")
_PYTHON = re.compile(r"^python[0-9.]*$")


@dataclass
class Relocated:
    """What ``relocate`` changed, for the build log."""

    scripts: list[str] = field(default_factory=list)
    pth_files: list[str] = field(default_factory=list)


def find_venvs(root: Path, *, depth: int = MAX_DEPTH) -> list[Path]:
    """Directories at most ``depth`` levels below ``root`` (itself included) holding a
    ``pyvenv.cfg`` and a ``bin/``: the virtualenvs of an artifact, sorted."""
    found: list[Path] = []
    level = [root]
    for _ in range(depth + 1):
        below: list[Path] = []
        for d in level:
            if (d / PYVENV_CFG).is_file() and (d / "bin").is_dir():
                found.append(d)
                continue
            try:
                with os.scandir(d) as it:
                    below += [Path(e.path) for e in it if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
        level = below
    return sorted(found)


def venv_bins(artifact: Path) -> list[Path]:
    """``bin`` of each virtualenv directly in the artifact root (``.venv``, ``venv``): what a
    replica gets first on its ``PATH``."""
    return [v / "bin" for v in find_venvs(artifact, depth=1) if v != artifact]


def relocate(root: Path, *, old_roots: Sequence[Path]) -> Relocated:
    """Make every venv under ``root`` work from any path: console scripts whose ``#!`` names an
    interpreter of their own venv by an absolute path, and ``.pth`` lines under one of
    ``old_roots`` (where the tree was built). Files are replaced, never written in place (they
    may be hard links into the dependency cache). Idempotent; blocking."""
    done = Relocated()
    olds = [os.fspath(p) for p in old_roots]
    for venv in find_venvs(root):
        rel = venv.relative_to(root)
        bin_dir = venv / "bin"
        for entry in sorted(os.scandir(bin_dir), key=lambda e: e.name):
            if entry.is_file(follow_symlinks=False) and _relocate_script(Path(entry.path), rel):
                done.scripts.append((rel / "bin" / entry.name).as_posix())
        for pth in sorted(venv.glob("lib/python*/site-packages/*.pth")):
            if not pth.is_symlink() and _relocate_pth(pth, olds):
                done.pth_files.append(pth.relative_to(root).as_posix())
    return done


def interpreter_link(link: Path, root: Path) -> str | None:
    """Whether the symlink ``link`` (under ``root``) is a venv's link to its base interpreter.

    None: it is not a venv's ``bin/python*`` (the caller's own rules apply). "ok": it is, and the
    interpreter exists. Otherwise the reason the venv cannot run, saying how to make one that
    can (the build fails with it)."""
    if link.parent.name != "bin" or not _PYTHON.match(link.name):
        return None
    venv = link.parent.parent
    if not (venv / PYVENV_CFG).is_file():
        return None
    target = os.readlink(link)
    real = os.path.realpath(link)
    if os.path.isfile(real) and os.access(real, os.X_OK):
        return "ok"
    rel = link.relative_to(root).as_posix()
    return (
        f"virtualenv {venv.relative_to(root).as_posix() or '.'}: {rel} links to {target}, which "
        "does not exist on this host, so the venv cannot run. Make it with an interpreter on the "
        "build's PATH (/usr/local/bin:/usr/bin:/bin), e.g. python3 -m venv .venv, or copy the "
        "interpreter into it: python3 -m venv --copies .venv"
    )


def _relocate_script(path: Path, venv: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(_SHEBANG_MAX)
    except OSError:
        return False
    if not head.startswith(b"#!"):
        return False
    long_form = _LONG_FORM.match(head)
    if long_form is not None:
        interpreter, header_len = long_form.group(1).decode(errors="replace"), long_form.end()
    else:
        line, nl, _ = head.partition(b"\n")
        if not nl:
            return False
        interpreter = line[2:].decode(errors="replace").strip()
        header_len = len(line) + 1
        if " " in interpreter:  # "#!/usr/bin/env python3", "#!/x/python -E": not ours
            return False
    name = os.path.basename(interpreter)
    own = f"/{venv.as_posix()}/bin/{name}" if venv.parts else f"/bin/{name}"
    if (
        not os.path.isabs(interpreter)
        or not _PYTHON.match(name)
        or not interpreter.endswith(own)
        or not os.path.lexists(path.parent / name)
    ):
        return False
    header = (
        "#!/bin/sh\n"
        f'\'\'\'exec\' "$(dirname -- "$(realpath -- "$0")")"/\'{name}\' "$0" "$@"\n'
        "' '''\n"
    ).encode()
    with open(path, "rb") as f:
        body = f.read()[header_len:]
    _replace(path, header + body)
    return True


def _relocate_pth(path: Path, olds: Sequence[str]) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    site = os.fspath(path.parent)
    changed = False
    lines = []
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        for old in olds:
            if stripped == old or stripped.startswith(old + os.sep):
                # site.addpackage joins a relative line to the site-packages directory.
                stripped = os.path.relpath(stripped, site)
                line = stripped + line[len(line.rstrip("\r\n")) :]
                changed = True
                break
        lines.append(line)
    if changed:
        _replace(path, "".join(lines).encode())
    return changed


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file over ``path`` (same mode): a hard link's other names keep
    the old content."""
    mode = os.lstat(path).st_mode & 0o7777
    tmp = path.with_name(f".{path.name}.shipyard-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode | 0o200)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        os.fchmod(f.fileno(), mode)
    os.replace(tmp, path)
