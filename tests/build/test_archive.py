"""``build/archive.py`` on its own: a tree streamed and extracted hashes to the same digest,
whatever its names (long ones take PAX headers, non-UTF-8 bytes survive), and where a link
resolves is decided as the kernel would, over the tree's own links."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest

from shipyard.build.archive import UnsafeArchive, extract_tree, stream_tree
from shipyard.build.digest import digest_tree
from shipyard.domain.tar_names import safe_name
from tests.agent.artifact_server import member, tar_of


def _tree(root: Path) -> Path:
    root.mkdir()
    (root / ("long-" + "n" * 240)).mkdir()  # beyond ustar's 100-byte name field
    (root / ("long-" + "n" * 240) / "file.py").write_text("x = 1\n")
    (root / "spaces and ünïcode.txt").write_text("text\n")
    (root / "empty").write_bytes(b"")
    os.makedirs(root / "a" / "b" / "c")
    (root / "a" / "b" / "c" / "run.sh").write_text("#!/bin/sh\n")
    (root / "a" / "b" / "c" / "run.sh").chmod(0o700)
    os.symlink("b/c/run.sh", root / "a" / "link")
    os.symlink("dangling-but-inside", root / "a" / "dangling")
    os.symlink("../" * 1 + "empty", root / "a" / "up-one")
    raw = os.fsencode(root) + b"/bytes-\xff\xfe.bin"  # not UTF-8
    with open(raw, "wb") as f:
        f.write(b"\0" * 70_000)
    return root


@pytest.mark.parametrize("gzip_level", [None, 1], ids=["tar", "gzip"])
def test_a_tree_round_trips_to_the_same_digest(tmp_path: Path, gzip_level: int | None) -> None:
    tree = _tree(tmp_path / "tree")
    data = b"".join(stream_tree(tree, gzip_level=gzip_level))
    if gzip_level is not None:
        data = gzip.decompress(data)
    out = tmp_path / "out"
    out.mkdir()
    extracted = extract_tree(io.BytesIO(data), out)
    assert digest_tree(out) == digest_tree(tree)
    assert extracted.entries == sum(len(d) + len(f) for _, d, f in os.walk(tree))
    assert len(data) % tarfile.RECORDSIZE == 0  # whole records, as tar(1) writes them


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a/b", "a/b"),
        ("./a//b/", "a/b"),
        ("/a", None),
        ("a/../b", None),
        ("..", None),
        ("", None),
        ("a\0b", None),
        ("x" * 5000, None),
    ],
)
def test_safe_names(raw: str, expected: str | None) -> None:
    assert safe_name(raw) == expected


def _link(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    return member(name, tarfile.SYMTYPE, link=target), None


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    return member(name, tarfile.DIRTYPE, mode=0o755), None


VENV = [_dir("v"), (member("v/pyvenv.cfg"), b"home = /usr/bin\n"), _dir("v/bin")]

LINKS = {
    # accepted
    "sibling": ([_link("a", "b")], None),
    "into-a-directory": ([_dir("d"), _link("a", "d/x")], None),
    "up-then-down-inside": ([_dir("d"), _link("d/a", "../b")], None),
    "through-a-link-staying-inside": ([_dir("d"), _link("l", "d"), _link("a", "l/../b")], None),
    "venv-interpreter": ([*VENV, _link("v/bin/python", "/usr/bin/python3")], None),
    "venv-interpreter-by-name": (
        [*VENV, _link("v/bin/python", "/usr/bin/python3"), _link("v/bin/python3", "python")],
        None,
    ),
    "a-loop": ([_link("a", "b"), _link("b", "a")], None),
    # refused
    "up-out": ([_link("a", "../b")], "link_escapes"),
    "deep-up-out": ([_dir("d"), _link("d/a", "../../b")], "link_escapes"),
    "absolute": ([_link("a", "/etc/passwd")], "link_escapes"),
    "through-a-link-out": (
        [_dir("d"), _link("d/up", ".."), _link("x", "d/up/..")],
        "link_escapes",
    ),
    "through-a-link-to-the-root-then-up": (
        [_link("self", "."), _link("x", "self/../y")],
        "link_escapes",
    ),
    "below-the-interpreter": (
        [*VENV, _link("v/bin/python", "/usr/bin/python3"), _link("x", "v/bin/python/../..")],
        "link_escapes",
    ),
    "interpreter-name-without-pyvenv-cfg": (
        [_dir("v"), _dir("v/bin"), _link("v/bin/python", "/usr/bin/python3")],
        "link_escapes",
    ),
}


@pytest.mark.parametrize(("members", "reason"), list(LINKS.values()), ids=list(LINKS))
def test_where_links_resolve(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], reason: str | None
) -> None:
    data = tar_of(*members)
    if reason is None:
        extract_tree(io.BytesIO(data), tmp_path)
        return
    with pytest.raises(UnsafeArchive) as refused:
        extract_tree(io.BytesIO(data), tmp_path)
    assert refused.value.reason == reason


def test_garbage_is_not_a_tar(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchive) as refused:
        extract_tree(io.BytesIO(b"not a tar at all" * 100), tmp_path)
    assert refused.value.reason == "not_a_tar"
