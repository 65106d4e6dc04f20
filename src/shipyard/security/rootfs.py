"""The files of an image the scanner reads, taken out of a hostile tar stream.

An image's filesystem arrives as a tar stream (``docker export`` of a created, never started
container: the layers already applied, whiteouts honoured by the engine). Everything in it was
written by whoever wrote the Dockerfile, so it is treated as hostile. ``extract_scan_files``
reads the stream once, member by member (``tarfile`` stream mode: never the whole image in
memory or on disk), and writes into ``dest`` only what ``inventory.from_tree`` reads:

* Python distributions' metadata: ``*.dist-info/METADATA``, ``*.egg-info/PKG-INFO`` and
  single-file ``*.egg-info``, anywhere in the tree;
* Debian's ``var/lib/dpkg/status`` and distroless ``var/lib/dpkg/status.d/*``;
* Alpine's ``lib/apk/db/installed``;
* ``etc/os-release`` / ``usr/lib/os-release`` (which distribution, for the package URLs).

Only regular files are written, always as new regular files under ``dest`` (opened with
``O_NOFOLLOW``, parents made by us): an absolute name, a ``..`` component, a symlink, a hard link
or a device node is never created and never followed, so nothing lands outside ``dest``. Sizes
are bounded per file (``ExtractLimits.max_file_bytes``: the file is skipped with its reason) and
in total (``max_total_bytes`` / ``max_files``: the extraction is refused, since a scan of part of
an image would vouch for what it never read).

Called by the orchestrator's scan stage (``orchestrator/preflight.py``) on the stream that
``build/image_export.py`` gets from Docker Engine; pure stdlib, no engine here.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from shipyard.domain.tar_names import safe_name
from shipyard.errors import SecurityScanFailed
from shipyard.security import inventory as inv

#: Exact paths (relative to the image root) the scanner reads.
_EXACT = frozenset(
    {
        "var/lib/dpkg/status",
        "lib/apk/db/installed",
        "etc/os-release",
        "usr/lib/os-release",
    }
)
_CHUNK = 1 << 16


@dataclass(frozen=True)
class ExtractLimits:
    """Bounds on what one image may make us write."""

    #: One file above this is skipped (a real dpkg status of a large system is ~5 MB).
    max_file_bytes: int = 32 * 1024 * 1024
    #: All written files together; past it the extraction is refused.
    max_total_bytes: int = 256 * 1024 * 1024
    #: Files written; past it the extraction is refused.
    max_files: int = 100_000


@dataclass
class ExtractReport:
    """What ``extract_scan_files`` wrote and what it left out, with the reason."""

    files: int = 0
    bytes: int = 0
    #: Members the stream held (every kind), to show the whole image was read.
    members: int = 0
    #: (name in the image, why it was not written), for the scan stage's record.
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "members": self.members,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped[:50]],
            "skipped_total": len(self.skipped),
        }


def wanted(name: str) -> bool:
    """Whether the scanner reads the image file ``name`` (normalized, relative)."""
    if name in _EXACT:
        return True
    parent, _, base = name.rpartition("/")
    if parent == "var/lib/dpkg/status.d":
        return True
    if base == "METADATA" and parent.endswith(".dist-info"):
        return True
    if base == "PKG-INFO" and parent.endswith(".egg-info"):
        return True
    return base.endswith(".egg-info")  # a single-file egg-info (old distutils installs)


def _refuse(message: str) -> SecurityScanFailed:
    return SecurityScanFailed(message, vulnerabilities=0, reason="image_not_scannable")


def _write(source: IO[bytes], target: Path, size: int) -> None:
    """Copy exactly ``size`` bytes to a new regular file; never through a symlink."""
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(target, flags, 0o600)
    with os.fdopen(fd, "wb") as out:
        left = size
        while left > 0:
            chunk = source.read(min(_CHUNK, left))
            if not chunk:
                raise _refuse(f"the image's tar stream ended inside {target.name}")
            out.write(chunk)
            left -= len(chunk)


def extract_scan_files(
    stream: IO[bytes], dest: Path, limits: ExtractLimits | None = None
) -> ExtractReport:
    """Read the tar ``stream`` to its end and write the scanner's files under ``dest`` (an
    existing, empty directory the caller owns and removes). Raises ``SecurityScanFailed`` when
    the stream is not a tar or the image exceeds the total bounds."""
    limits = limits or ExtractLimits()
    report = ExtractReport()
    root = dest.resolve()
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                report.members += 1
                name = safe_name(member.name)
                if name is None:
                    report.skipped.append((member.name[:200], "unsafe path"))
                    continue
                if member.isdir() or not wanted(name):
                    continue
                if not member.isreg():
                    # A link or device where the scanner expects a file: never created, never
                    # followed (a symlinked METADATA could point anywhere on this machine).
                    kind = "link" if (member.issym() or member.islnk()) else "not a regular file"
                    report.skipped.append((name, kind))
                    continue
                if member.size > limits.max_file_bytes:
                    report.skipped.append(
                        (name, f"larger than {limits.max_file_bytes} bytes ({member.size})")
                    )
                    continue
                if report.bytes + member.size > limits.max_total_bytes:
                    raise _refuse(
                        f"the image holds more than {limits.max_total_bytes} bytes of package "
                        "metadata; refusing to scan part of it"
                    )
                if report.files >= limits.max_files:
                    raise _refuse(
                        f"the image holds more than {limits.max_files} package metadata files; "
                        "refusing to scan part of it"
                    )
                target = root / name
                # safe_name already excludes escapes; this is the belt to its braces.
                if not str(target).startswith(str(root) + os.sep):
                    report.skipped.append((name, "unsafe path"))
                    continue
                source = tar.extractfile(member)
                if source is None:
                    report.skipped.append((name, "unreadable member"))
                    continue
                try:
                    _write(source, target, member.size)
                except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
                    # The image's own contradictions: a parent that is a file we wrote
                    # ("x.egg-info" then "x.egg-info/PKG-INFO"), a file over a directory.
                    report.skipped.append((name, f"not written: {exc.strerror or exc}"))
                    continue
                except OSError as exc:
                    # This machine's trouble (disk full, I/O error): a scan that silently
                    # missed packages would vouch for them, so none is made.
                    raise _refuse(
                        f"cannot write the image's {name} for scanning: {exc.strerror or exc}"
                    ) from exc
                report.files += 1
                report.bytes += member.size
    except tarfile.TarError as exc:
        raise _refuse(f"the image's filesystem is not a readable tar stream: {exc}") from exc
    return report


def display_path(root: Path, path: str) -> str:
    """``path`` (under the extraction root) as the image names it: ``/usr/lib/...``."""
    try:
        return "/" + posixpath.normpath(Path(path).relative_to(root).as_posix())
    except ValueError:
        return path


def image_inventory(root: Path, image: str) -> inv.Inventory:
    """``inventory.from_tree`` of the extracted files, with ``image`` as its source and every
    location as the image names it (not this machine's temporary directory). Called by the
    gate and by ``shipyard scan --image``."""
    found = inv.from_tree(root)
    return dataclasses.replace(
        found,
        source=image,
        kind="image",
        packages=tuple(
            dataclasses.replace(p, location=display_path(root, p.location)) for p in found.packages
        ),
        skipped=tuple(inv.Skipped(display_path(root, s.source), s.reason) for s in found.skipped),
    )
