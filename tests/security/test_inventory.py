"""What an artifact contains: distributions in trees and environments, pins in requirements and
lock files, and Debian packages from a dpkg status file."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from shipyard.errors import InvalidInput
from shipyard.security import inventory
from shipyard.security.inventory import DEBIAN, PYPI

from .conftest import debian_root, dist_info


def pkgs(inv: inventory.Inventory) -> set[tuple[str, str]]:
    return {(p.name, p.version) for p in inv.packages}


@pytest.mark.parametrize(
    ("name", "normalized"),
    [
        ("Django", "django"),
        ("zope.interface", "zope-interface"),
        ("Foo__Bar-._baz", "foo-bar-baz"),
        ("PyYAML", "pyyaml"),
    ],
)
def test_normalize_name(name: str, normalized: str) -> None:
    assert inventory.normalize_name(name) == normalized


def test_tree_finds_every_kind_of_metadata(tmp_path: Path) -> None:
    site = tmp_path / "venv/lib/python3.11/site-packages"
    dist_info(site, "Foo_Bar", "1.0")
    dist_info(site, "oldstyle", "0.5", egg=True)
    (site / "single-2.0-py3.11.egg-info").write_text(
        "Metadata-Version: 1.0\nName: single\nVersion: 2.0\n"
    )
    dist_info(
        site / "pip/_vendor", "vendored", "3.1"
    )  # vendored copies are code in the artifact too
    dist_info(tmp_path / "deps", "targeted", "4.0")  # pip install --target
    (site / "broken-1.0.dist-info").mkdir()
    nover = site / "nover-1.0.dist-info"
    nover.mkdir()
    (nover / "METADATA").write_text("Metadata-Version: 2.1\nName: nover\n")
    inv = inventory.from_tree(tmp_path)
    assert pkgs(inv) == {
        ("foo-bar", "1.0"),
        ("oldstyle", "0.5"),
        ("single", "2.0"),
        ("vendored", "3.1"),
        ("targeted", "4.0"),
    }
    assert all(p.ecosystem == PYPI for p in inv.packages)
    reasons = {Path(s.source).name: s.reason for s in inv.skipped}
    assert "no METADATA" in reasons["broken-1.0.dist-info"]
    assert "no Name or Version" in reasons["METADATA"]


def test_tree_does_not_follow_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    dist_info(outside, "elsewhere", "1.0")
    tree = tmp_path / "tree"
    dist_info(tree / "lib", "inside", "1.0")
    os.symlink(outside, tree / "link")
    os.symlink(tree / "lib", tree / "lib64")  # venv-style alias: listed once, not twice
    inv = inventory.from_tree(tree)
    assert pkgs(inv) == {("inside", "1.0")}


def test_tree_reads_dpkg_status(tmp_path: Path) -> None:
    inv = inventory.from_tree(debian_root(tmp_path))
    deb = {p.name: p for p in inv.by_ecosystem(DEBIAN)}
    assert set(deb) == {"libssl3", "openssl", "libc6"}  # oldlib is deinstalled
    assert (deb["libssl3"].source_name, deb["libssl3"].source_version) == (
        "openssl",
        "3.0.11-1~deb12u2",
    )
    assert (deb["libc6"].source_name, deb["libc6"].source_version) == ("glibc", "2.36-9+deb12u4")
    assert deb["libc6"].version == "2.36-9+deb12u4+b1"
    assert deb["openssl"].release == "12"
    assert deb["openssl"].arch == "amd64"


def test_environment_reads_site_packages_only(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "pyvenv.cfg").parent.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    site = venv / "lib/python3.11/site-packages"
    dist_info(site, "requests", "2.31.0")
    dist_info(site / "pip/_vendor", "vendored", "1.0")  # not installed in the environment
    inv = inventory.from_environment(venv)
    assert inv.kind == "environment"
    assert pkgs(inv) == {("requests", "2.31.0")}


def test_scan_path_reads_a_venv_as_the_gate_reads_an_artifact(tmp_path: Path) -> None:
    # `shipyard scan DIR` must see what the deploy gate sees in the same directory (from_tree),
    # vendored copies included: they are installed code too.
    venv = tmp_path / "venv"
    (venv / "pyvenv.cfg").parent.mkdir()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    site = venv / "lib/python3.11/site-packages"
    dist_info(site, "requests", "2.31.0")
    dist_info(site / "setuptools/_vendor", "packaging", "24.2")
    inv = inventory.from_path(venv)
    assert inv == inventory.from_tree(venv)
    assert pkgs(inv) == {("requests", "2.31.0"), ("packaging", "24.2")}
    assert inv.resolved


def test_pip_report_is_the_resolved_set(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text(
        json.dumps(
            {
                "version": "1",
                "install": [
                    {"metadata": {"name": "Flask", "version": "2.2.2"}, "requested": True},
                    {"metadata": {"name": "Werkzeug", "version": "2.2.2"}, "requested": False},
                    {
                        "metadata": {"name": "myapp", "version": "0.1"},
                        "download_info": {"url": "file:///src", "dir_info": {}},
                    },
                    {"metadata": {"name": "broken"}},
                ],
            }
        )
    )
    inv = inventory.from_path(report)
    assert (inv.kind, inv.resolved) == ("pip-report", True)
    assert pkgs(inv) == {("flask", "2.2.2"), ("werkzeug", "2.2.2")}
    assert [s.reason for s in inv.skipped] == [
        "myapp: local directory, not a released distribution",
        "entry without metadata name and version",
    ]


def test_json_that_is_not_a_pip_report_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "package.json"
    other.write_text('{"name": "web"}')
    with pytest.raises(InvalidInput, match="pip installation report"):
        inventory.from_path(other)


def test_requirements_are_unresolved_and_lock_files_resolved(tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("requests==2.31.0\n")
    lock = tmp_path / "uv.lock"
    lock.write_text('[[package]]\nname = "requests"\nversion = "2.31.0"\n')
    assert inventory.from_path(req).resolved is False
    assert inventory.from_path(lock).resolved is True


def test_environment_without_site_packages(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no lib/python"):
        inventory.from_environment(tmp_path)


def test_running_interpreter_environment() -> None:
    inv = inventory.from_environment(None)
    names = {p.name for p in inv.packages}
    assert {"pytest", "packaging", "cryptography"} <= names
    pytest_pkg = next(p for p in inv.packages if p.name == "pytest")
    assert pytest_pkg.version == pytest.__version__
    assert any(Path(e).is_dir() for e in sys.path)


REQUIREMENTS = """\
# comment
Django==4.2.5  # trailing comment
requests == 2.31.0 \\
    --hash=sha256:0000000000000000000000000000000000000000000000000000000000000000
urllib3===1.26.16
pyyaml[libyaml]==6.0.1 ; python_version >= "3.8"
flask>=2.0
numpy
jinja2==3.*
click>=8,<9
-e ./local-package
mylib @ https://example.invalid/mylib-1.0.tar.gz
--index-url https://example.invalid/simple
--unknown-flag
-r more.txt
-r missing.txt
"""


def test_requirements_file(tmp_path: Path) -> None:
    (tmp_path / "more.txt").write_text("attrs==23.1.0\n-r requirements.txt\n")  # a cycle
    req = tmp_path / "requirements.txt"
    req.write_text(REQUIREMENTS)
    inv = inventory.from_path(req)
    assert inv.kind == "requirements"
    assert pkgs(inv) == {
        ("django", "4.2.5"),
        ("requests", "2.31.0"),
        ("urllib3", "1.26.16"),
        ("pyyaml", "6.0.1"),
        ("attrs", "23.1.0"),
    }
    skipped = {s.source.rsplit(":", 1)[1]: s.reason for s in inv.skipped}
    assert skipped == {
        "7": "flask: not pinned with == (>=2.0)",
        "8": "numpy: no version specifier",
        "9": "jinja2: not pinned with == (==3.*)",
        "10": "click: not pinned with == (<9,>=8)",
        "11": "editable install: no released version to check",
        "12": (
            "mylib: direct reference (https://example.invalid/mylib-1.0.tar.gz), "
            "no version to check"
        ),
        "14": "option line not understood: --unknown-flag",
        "16": "included file missing.txt not found",
    }
    django = next(p for p in inv.packages if p.name == "django")
    assert django.location == f"{req}:2"


def test_uv_and_poetry_lock(tmp_path: Path) -> None:
    lock = tmp_path / "uv.lock"
    lock.write_text(
        'version = 1\n\n[[package]]\nname = "Django"\nversion = "4.2.5"\n\n'
        '[[package]]\nname = "myapp"\nversion = "0.1.0"\nsource = { editable = "." }\n\n'
        '[[package]]\nname = "gitdep"\nsource = { git = "https://example.invalid/x" }\n'
    )
    inv = inventory.from_path(lock)
    assert pkgs(inv) == {("django", "4.2.5")}
    assert [s.reason for s in inv.skipped] == [
        "myapp: local project, not a released distribution",
        "gitdep: no version (source or virtual package)",
    ]


def test_pipfile_lock(tmp_path: Path) -> None:
    lock = tmp_path / "Pipfile.lock"
    lock.write_text(
        json.dumps(
            {"default": {"requests": {"version": "==2.2.0"}, "local": {"path": "."}}, "develop": {}}
        )
    )
    inv = inventory.from_path(lock)
    assert pkgs(inv) == {("requests", "2.2.0")}
    assert inv.skipped[0].reason == "local: not pinned with =="


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no such file or directory"):
        inventory.from_path(tmp_path / "nope")
