"""Fixtures for the security gate tests: the real PyPA advisory database (shared/data), small
hand-written OSV databases, and installed-distribution trees made on disk."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shipyard.security import osv
from tests.shared_data import find_pypa_db


@pytest.fixture(scope="session")
def pypa_db_path() -> Path:
    path = find_pypa_db()
    if path is None:  # a project fixture (shared/data), not optional: fail loudly
        pytest.fail(
            "PyPA advisory database not found; "
            "set SHIPYARD_TEST_OSV_DB to shared/data/pypa-advisory-db"
        )
    return path


@pytest.fixture(scope="session")
def session_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Shipyard data dir shared by the session, so the parsed PyPA database is cached once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def osv_cache_dir(session_data_dir: Path) -> Path:
    return session_data_dir / "cache" / "osv"  # where the gate and the CLI keep it


@pytest.fixture(scope="session")
def pypa_db(pypa_db_path: Path, osv_cache_dir: Path) -> osv.OsvDatabase:
    return osv.load(pypa_db_path, cache_dir=osv_cache_dir)


def advisory(
    adv_id: str,
    name: str,
    *,
    events: list[dict[str, str]] | None = None,
    versions: list[str] | None = None,
    ecosystem: str = "PyPI",
    range_type: str = "ECOSYSTEM",
    aliases: list[str] | None = None,
    severity: list[dict[str, str]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A minimal valid OSV document."""
    affected: dict[str, Any] = {"package": {"ecosystem": ecosystem, "name": name}}
    if events is not None:
        affected["ranges"] = [{"type": range_type, "events": events}]
    if versions is not None:
        affected["versions"] = versions
    doc: dict[str, Any] = {
        "id": adv_id,
        "modified": "2024-01-01T00:00:00Z",
        "summary": f"{adv_id} in {name}",
        "affected": [affected],
        **extra,
    }
    if aliases:
        doc["aliases"] = aliases
    if severity:
        doc["severity"] = severity
    return doc


WriteDb = Callable[..., Path]


@pytest.fixture
def write_db(tmp_path: Path) -> WriteDb:
    """``write_db(doc, doc, ..., raw={"name": "text"})``: a directory database of JSON files."""
    counter = iter(range(10_000))

    def write(*docs: dict[str, Any], raw: dict[str, str] | None = None, name: str = "db") -> Path:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        for doc in docs:
            (root / f"{doc['id']}-{next(counter)}.json").write_text(json.dumps(doc))
        for fname, text in (raw or {}).items():
            (root / fname).parent.mkdir(parents=True, exist_ok=True)
            (root / fname).write_text(text)
        return root

    return write


def dist_info(site: Path, name: str, version: str, *, egg: bool = False) -> Path:
    """Install-like metadata for one distribution under ``site``."""
    if egg:
        d = site / f"{name}-{version}.egg-info"
        d.mkdir(parents=True, exist_ok=True)
        (d / "PKG-INFO").write_text(f"Metadata-Version: 1.1\nName: {name}\nVersion: {version}\n")
        return d
    d = site / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir(parents=True, exist_ok=True)
    (d / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: test\n\n"
        "Long description. Name: not-a-header\n"
    )
    return d


def artifact_tree(root: Path, packages: dict[str, str]) -> Path:
    """A built-artifact-like tree: app code plus a ``pip install --target deps`` directory."""
    (root / "app.py").parent.mkdir(parents=True, exist_ok=True)
    (root / "app.py").write_text("print('hi')\n")
    for name, version in packages.items():
        dist_info(root / "deps", name, version)
    return root


DPKG_STATUS = """\
Package: libssl3
Status: install ok installed
Priority: optional
Architecture: amd64
Source: openssl
Version: 3.0.11-1~deb12u2
Description: Secure Sockets Layer toolkit - shared libraries
 This package is part of the OpenSSL project's implementation.
 .
 It provides the libssl and libcrypto shared libraries.

Package: openssl
Status: install ok installed
Architecture: amd64
Version: 3.0.11-1~deb12u2
Description: Secure Sockets Layer toolkit

Package: libc6
Status: install ok installed
Architecture: amd64
Source: glibc (2.36-9+deb12u4)
Version: 2.36-9+deb12u4+b1

Package: oldlib
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1
"""


def debian_root(root: Path, release: str = "12") -> Path:
    (root / "var/lib/dpkg").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/dpkg/status").write_text(DPKG_STATUS)
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc/os-release").write_text(
        f'ID=debian\nVERSION_ID="{release}"\nPRETTY_NAME="Debian"\n'
    )
    return root
