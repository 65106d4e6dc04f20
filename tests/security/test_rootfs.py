"""Extracting the scanner's files from an image's tar stream: only package metadata is written,
and a hostile tar (absolute paths, ``..``, symlinks and hard links out, device nodes, huge files,
too many files) never writes outside the destination."""

from __future__ import annotations

import errno
import io
import tarfile
from pathlib import Path

import pytest

from shipyard.domain.tar_names import safe_name
from shipyard.errors import SecurityScanFailed
from shipyard.security import inventory, rootfs
from shipyard.security.rootfs import ExtractLimits, extract_scan_files, wanted

METADATA = b"Metadata-Version: 2.1\nName: Jinja2\nVersion: 2.7.1\n"


class Tar:
    """A tar stream built member by member, as a hostile image author would."""

    def __init__(self) -> None:
        self.members: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def file(self, name: str, data: bytes = b"x", *, size: int | None = None) -> Tar:
        body = data if size is None else b"\0" * size
        info = tarfile.TarInfo(name)
        info.size = len(body)
        self.members.append((info, body))
        return self

    def special(self, name: str, kind: bytes, target: str = "") -> Tar:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = target
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = 1, 3
        self.members.append((info, None))
        return self

    def stream(self) -> io.BytesIO:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for info, body in self.members:
                tar.addfile(info, None if body is None else io.BytesIO(body))
        return io.BytesIO(buffer.getvalue())


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    """(dest, outside): the extraction directory and a sibling that must stay untouched."""
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    return dest, outside


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("usr/lib/x.dist-info/METADATA", True, id="dist-info"),
        pytest.param("opt/app/x.egg-info/PKG-INFO", True, id="egg-info-dir"),
        pytest.param("usr/lib/python2.7/x-1.0.egg-info", True, id="egg-info-file"),
        pytest.param("var/lib/dpkg/status", True, id="dpkg-status"),
        pytest.param("var/lib/dpkg/status.d/libc6", True, id="distroless-status-d"),
        pytest.param("lib/apk/db/installed", True, id="apk"),
        pytest.param("etc/os-release", True, id="os-release"),
        pytest.param("usr/lib/os-release", True, id="os-release-fallback"),
        pytest.param("usr/lib/x.dist-info/RECORD", False, id="record"),
        pytest.param("etc/passwd", False, id="other-file"),
        pytest.param("var/lib/dpkg/status-old", False, id="dpkg-backup"),
        pytest.param("app/METADATA", False, id="metadata-outside-dist-info"),
    ],
)
def test_only_the_scanners_files_are_wanted(name: str, expected: bool) -> None:
    assert wanted(name) is expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("./var/lib/dpkg/status", "var/lib/dpkg/status", id="dot-slash"),
        pytest.param("var//lib/./dpkg/status", "var/lib/dpkg/status", id="redundant"),
        pytest.param("/etc/os-release", None, id="absolute"),
        pytest.param("../outside/x.dist-info/METADATA", None, id="dotdot-leading"),
        pytest.param("a/../../x.dist-info/METADATA", None, id="dotdot-inner"),
        pytest.param("a\x00b", None, id="nul"),
        pytest.param("", None, id="empty"),
        pytest.param("a/" * 3000, None, id="too-long"),
    ],
)
def test_safe_name(raw: str, expected: str | None) -> None:
    assert safe_name(raw) == expected


def test_writes_only_package_metadata(box: tuple[Path, Path]) -> None:
    dest, _ = box
    stream = (
        Tar()
        .file("bin/busybox", b"\x7fELF" + b"\0" * 100)
        .file("usr/lib/python3/site-packages/Jinja2-2.7.1.dist-info/METADATA", METADATA)
        .file("usr/lib/python3/site-packages/Jinja2-2.7.1.dist-info/RECORD", b"a,b,c\n")
        .file("var/lib/dpkg/status", b"Package: a\nVersion: 1\n")
        .file("lib/apk/db/installed", b"P:musl\nV:1.2.4-r2\n")
        .file("etc/os-release", b"ID=debian\n")
        .file("etc/shadow", b"root:secret\n")
        .stream()
    )
    report = extract_scan_files(stream, dest)
    assert files_under(dest) == {
        "usr/lib/python3/site-packages/Jinja2-2.7.1.dist-info/METADATA",
        "var/lib/dpkg/status",
        "lib/apk/db/installed",
        "etc/os-release",
    }
    assert report.files == 4
    assert report.members == 7
    assert report.bytes == sum((dest / f).stat().st_size for f in files_under(dest))
    meta = dest / "usr/lib/python3/site-packages/Jinja2-2.7.1.dist-info/METADATA"
    assert meta.read_bytes() == METADATA


def test_path_traversal_and_absolute_names_write_nothing_outside(
    box: tuple[Path, Path],
) -> None:
    dest, outside = box
    stream = (
        Tar()
        .file("../outside/evil.dist-info/METADATA", METADATA)
        .file(f"{outside}/abs.dist-info/METADATA", METADATA)
        .file("a/../../outside/x.egg-info", METADATA)
        .stream()
    )
    report = extract_scan_files(stream, dest)
    assert files_under(outside) == set()
    assert files_under(dest) == set()
    assert [reason for _, reason in report.skipped] == ["unsafe path"] * 3


def test_links_are_never_created_nor_followed(box: tuple[Path, Path]) -> None:
    dest, outside = box
    secret = outside / "secret"
    secret.write_text("Name: leaked\nVersion: 1\n")
    stream = (
        Tar()
        # A symlinked METADATA pointing at a file of this machine: not created.
        .special("site/leak.dist-info/METADATA", tarfile.SYMTYPE, str(secret))
        # A symlinked metadata directory pointing out, then a file "inside" it.
        .special("site/out.dist-info", tarfile.SYMTYPE, str(outside))
        .file("site/out.dist-info/METADATA", METADATA)
        # A hard link to a file outside and a symlinked os-release.
        .special("var/lib/dpkg/status", tarfile.LNKTYPE, str(secret))
        .special("etc/os-release", tarfile.SYMTYPE, "../usr/lib/os-release")
        .stream()
    )
    report = extract_scan_files(stream, dest)
    assert files_under(outside) == {"secret"}
    assert secret.read_text() == "Name: leaked\nVersion: 1\n"
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    # The file under the would-be symlink landed in a real directory inside dest.
    assert files_under(dest) == {"site/out.dist-info/METADATA"}
    assert dict(report.skipped) == {
        "site/leak.dist-info/METADATA": "link",
        "var/lib/dpkg/status": "link",
        "etc/os-release": "link",
    }
    packages = inventory.from_tree(dest).packages
    assert [(p.name, p.version) for p in packages] == [("jinja2", "2.7.1")]


def test_device_nodes_and_fifos_are_skipped(box: tuple[Path, Path]) -> None:
    dest, _ = box
    stream = (
        Tar()
        .special("var/lib/dpkg/status", tarfile.CHRTYPE)
        .special("lib/apk/db/installed", tarfile.FIFOTYPE)
        .stream()
    )
    report = extract_scan_files(stream, dest)
    assert files_under(dest) == set()
    assert dict(report.skipped) == {
        "var/lib/dpkg/status": "not a regular file",
        "lib/apk/db/installed": "not a regular file",
    }


def test_a_huge_file_is_skipped_and_the_rest_still_read(box: tuple[Path, Path]) -> None:
    dest, _ = box
    stream = (
        Tar()
        .file("site/huge.dist-info/METADATA", size=3 * 1024 * 1024)
        .file("site/ok.dist-info/METADATA", METADATA)
        .stream()
    )
    report = extract_scan_files(stream, dest, ExtractLimits(max_file_bytes=1024 * 1024))
    assert files_under(dest) == {"site/ok.dist-info/METADATA"}
    (path, reason), *_ = report.skipped
    assert path == "site/huge.dist-info/METADATA"
    assert reason.startswith("larger than 1048576 bytes")


def test_too_much_metadata_in_total_is_refused(box: tuple[Path, Path]) -> None:
    dest, _ = box
    tar = Tar()
    for i in range(5):
        tar.file(f"site/p{i}.dist-info/METADATA", b"y" * 1000)
    with pytest.raises(SecurityScanFailed, match="more than 3000 bytes") as info:
        extract_scan_files(tar.stream(), dest, ExtractLimits(max_total_bytes=3000))
    assert info.value.detail["reason"] == "image_not_scannable"


def test_too_many_files_is_refused(box: tuple[Path, Path]) -> None:
    dest, _ = box
    tar = Tar()
    for i in range(4):
        tar.file(f"site/p{i}.dist-info/METADATA", METADATA)
    with pytest.raises(SecurityScanFailed, match="more than 3 package metadata files"):
        extract_scan_files(tar.stream(), dest, ExtractLimits(max_files=3))


def test_a_stream_that_is_not_a_tar_is_refused(box: tuple[Path, Path]) -> None:
    dest, _ = box
    with pytest.raises(SecurityScanFailed, match="not a readable tar stream"):
        extract_scan_files(io.BytesIO(b"this is not a tar archive" * 40), dest)


def test_a_file_then_a_directory_of_the_same_name_is_skipped(box: tuple[Path, Path]) -> None:
    dest, _ = box
    stream = (
        Tar().file("site/x.egg-info", METADATA).file("site/x.egg-info/PKG-INFO", METADATA).stream()
    )
    report = extract_scan_files(stream, dest)
    assert files_under(dest) == {"site/x.egg-info"}
    assert [p for p, _ in report.skipped] == ["site/x.egg-info/PKG-INFO"]


def test_a_full_disk_fails_the_scan_instead_of_missing_packages(
    box: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    dest, _ = box

    def full(source: object, target: Path, size: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rootfs, "_write", full)
    stream = Tar().file("site/ok.dist-info/METADATA", METADATA).stream()
    with pytest.raises(SecurityScanFailed, match="No space left on device") as info:
        extract_scan_files(stream, dest)
    assert info.value.detail["reason"] == "image_not_scannable"
