"""OS packages of an image: the dpkg and apk database parsers (edge cases), the distribution read
from os-release, their package URLs in the SBOM, apk version ordering, and matching against
Debian / Ubuntu / Alpine advisories as OSV names them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shipyard.security import inventory, osv, sbom
from shipyard.security.inventory import ALPINE, DEBIAN, UBUNTU_ECOSYSTEM, _Collector
from shipyard.security.scanning import OsvScanner
from shipyard.security.versions import ordering_for, parse_apk

from .conftest import WriteDb, advisory

# --- dpkg ---------------------------------------------------------------------------------------

DPKG_EDGES = """\
Package: tzdata
Status: install ok installed
Architecture: all
Version: 2024a-0+deb12u1
Description: time zone and daylight-saving time data
 This package contains data required for the implementation of
 standard local time for many representative locations around the
 .
 globe. Source: not-a-field (a continuation line that looks like one)
Conffiles:
 /etc/default/tzdata 0123456789abcdef
 /etc/timezone 0123456789abcdef obsolete

Package: removed-pkg
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1

Package: half
Status: install reinstreq half-installed
Version: 2.0-1

Package: no-version
Status: install ok installed
Architecture: amd64

Version: 9.9
Description: a paragraph without a Package field

Package: held
Status: hold ok installed
Architecture: arm64
Source: held-src
Version: 1:3.4-5

Package: no-status
Version: 7
"""


def test_dpkg_parser_edge_cases() -> None:
    out = _Collector()
    found = {p.name: p for p in inventory.parse_dpkg_status(DPKG_EDGES, "status", out)}
    # deinstalled and half-installed packages are not on disk as code; held ones are.
    assert set(found) == {"tzdata", "held", "no-status"}
    # The multi-line Description swallowed its "Source:"-looking line: no source was set.
    assert (found["tzdata"].source_name, found["tzdata"].version) == ("tzdata", "2024a-0+deb12u1")
    assert found["tzdata"].arch == "all"
    assert (found["held"].source_name, found["held"].source_version) == ("held-src", "1:3.4-5")
    assert found["held"].arch == "arm64"
    assert found["no-status"].arch is None
    reasons = sorted(s.reason for s in out.skipped)
    assert reasons == [
        "dpkg paragraph ? without Package or Version",
        "dpkg paragraph no-version without Package or Version",
    ]


def test_distroless_status_d_and_crlf(tmp_path: Path) -> None:
    status_d = tmp_path / "var/lib/dpkg/status.d"
    status_d.mkdir(parents=True)
    (status_d / "base").write_text(
        "Package: base-files\r\nVersion: 12.4\r\nArchitecture: amd64\r\n"
    )
    (status_d / "libc6").write_text("Package: libc6\nVersion: 2.36-9\nSource: glibc\n")
    (status_d / "libc6.md5sums").write_text("Package: not-a-package\nVersion: 0\n")
    found = {p.name: p for p in inventory.from_tree(tmp_path).by_ecosystem(DEBIAN)}
    assert set(found) == {"base-files", "libc6"}
    assert found["base-files"].version == "12.4"
    assert found["base-files"].arch == "amd64"
    assert found["libc6"].source_name == "glibc"


# --- apk ----------------------------------------------------------------------------------------

APK_INSTALLED = """\
C:Q1SOMECHECKSUM=
P:musl
V:1.2.4_git20230717-r4
A:x86_64
S:383152
I:622592
T:the musl c library (libc) implementation
U:https://musl.libc.org/
L:MIT
o:musl
m:Timo Teräs <timo.teras@iki.fi>
t:1700000000
F:lib
R:ld-musl-x86_64.so.1
a:0:0:755
Z:Q1OTHERCHECKSUM=

P:libcrypto3
V:3.1.4-r5
A:x86_64
o:openssl
D:so:libc.musl-x86_64.so.1

P:no-version
A:x86_64
o:something

V:1.0-r0
A:x86_64

P:busybox
V:1.36.1-r15
"""


def test_apk_parser() -> None:
    out = _Collector()
    found = {p.name: p for p in inventory.parse_apk_installed(APK_INSTALLED, "installed", out)}
    assert set(found) == {"musl", "libcrypto3", "busybox"}
    musl = found["musl"]
    assert (musl.ecosystem, musl.version, musl.arch, musl.source_name) == (
        ALPINE,
        "1.2.4_git20230717-r4",
        "x86_64",
        "musl",
    )
    # Alpine's advisories name the origin (aports) package: libcrypto3 comes from openssl.
    assert (found["libcrypto3"].source_name, found["libcrypto3"].source_version) == (
        "openssl",
        "3.1.4-r5",
    )
    assert (found["busybox"].arch, found["busybox"].source_name) == (None, "busybox")
    assert sorted(s.reason for s in out.skipped) == [
        "apk entry ? without P: (name) or V: (version)",
        "apk entry no-version without P: (name) or V: (version)",
    ]


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        pytest.param("1.2.3-r0", "1.2.3-r1", id="revision"),
        pytest.param("1.2.3", "1.2.10", id="numeric-not-lexical"),
        pytest.param("1.2", "1.2.1", id="more-components"),
        pytest.param("1.2.3_rc1", "1.2.3", id="rc-before-release"),
        pytest.param("1.2.3_alpha2", "1.2.3_beta1", id="alpha-before-beta"),
        pytest.param("1.2.3_pre1", "1.2.3_rc1", id="pre-before-rc"),
        pytest.param("1.2.3", "1.2.3_p1", id="patch-after-release"),
        pytest.param("1.2.3_git20230101", "1.2.3_p1", id="git-before-p"),
        pytest.param("1.2.3", "1.2.3a", id="letter"),
        pytest.param("1.2.3a", "1.2.3b", id="letters"),
        pytest.param("3.1.4-r5", "3.1.5-r0", id="version-beats-revision"),
    ],
)
def test_apk_version_order(lower: str, higher: str) -> None:
    lo, hi = parse_apk(lower), parse_apk(higher)
    assert lo is not None and hi is not None
    assert lo < hi
    assert not hi < lo


def test_apk_versions_that_are_not_versions() -> None:
    assert parse_apk("latest") is None
    assert parse_apk("1.2.3-rX") is None
    assert parse_apk("1.2.3~abc-r1") == parse_apk("1.2.3-r1")  # the hash takes no part
    assert ordering_for("Alpine:v3.19") is parse_apk


# --- os-release, package URLs -------------------------------------------------------------------


def _tree(root: Path, os_release: str | None, *, dpkg: bool = False, apk: bool = False) -> Path:
    if os_release is not None:
        (root / "etc").mkdir(parents=True)
        (root / "etc/os-release").write_text(os_release)
    if dpkg:
        (root / "var/lib/dpkg").mkdir(parents=True)
        (root / "var/lib/dpkg/status").write_text(
            "Package: libssl3\nStatus: install ok installed\nArchitecture: amd64\n"
            "Source: openssl\nVersion: 3.0.2-0ubuntu1.10\n"
        )
    if apk:
        (root / "lib/apk/db").mkdir(parents=True)
        (root / "lib/apk/db/installed").write_text(APK_INSTALLED)
    return root


def purls(root: Path) -> set[str]:
    inv = inventory.from_tree(root)
    bom = sbom.build_bom(inv, sbom.SbomSubject(digest="sha256:" + "a" * 64, name="img"))
    data = json.loads(sbom.to_json(bom))
    return {c["purl"] for c in data["components"]}


def test_ubuntu_packages_are_named_after_ubuntu(tmp_path: Path) -> None:
    root = _tree(tmp_path, 'NAME="Ubuntu"\nID=ubuntu\nVERSION_ID="22.04"\n', dpkg=True)
    (pkg,) = inventory.from_tree(root).packages
    assert (pkg.ecosystem, pkg.release, pkg.distro) == (UBUNTU_ECOSYSTEM, "22.04", "ubuntu")
    assert purls(root) == {
        "pkg:deb/ubuntu/libssl3@3.0.2-0ubuntu1.10?arch=amd64&distro=ubuntu-22.04"
    }


def test_alpine_packages_in_the_sbom(tmp_path: Path) -> None:
    root = _tree(tmp_path, "ID=alpine\nVERSION_ID=3.19.1\n", apk=True)
    assert purls(root) == {
        "pkg:apk/alpine/musl@1.2.4_git20230717-r4?arch=x86_64&distro=alpine-3.19.1",
        "pkg:apk/alpine/libcrypto3@3.1.4-r5?arch=x86_64&distro=alpine-3.19.1",
        "pkg:apk/alpine/busybox@1.36.1-r15?distro=alpine-3.19.1",
    }
    bom = json.loads(
        sbom.to_json(
            sbom.build_bom(
                inventory.from_tree(root),
                sbom.SbomSubject(digest="sha256:" + "a" * 64, name="img"),
            )
        )
    )
    libcrypto = next(c for c in bom["components"] if c["name"] == "libcrypto3")
    assert {"name": "shipyard:apk:source", "value": "openssl"} in libcrypto["properties"]


def test_without_os_release_the_default_namespaces_and_no_release(tmp_path: Path) -> None:
    root = _tree(tmp_path, None, dpkg=True, apk=True)
    assert purls(root) == {
        "pkg:deb/debian/libssl3@3.0.2-0ubuntu1.10?arch=amd64",
        "pkg:apk/alpine/musl@1.2.4_git20230717-r4?arch=x86_64",
        "pkg:apk/alpine/libcrypto3@3.1.4-r5?arch=x86_64",
        "pkg:apk/alpine/busybox@1.36.1-r15",
    }


def test_each_database_keeps_its_own_family_in_a_mixed_tree(tmp_path: Path) -> None:
    # os-release names Debian: the dpkg packages are Debian 12's; apk's stay Alpine's, with no
    # release (Debian's "12" is not an Alpine release).
    root = _tree(tmp_path, "ID=debian\nVERSION_ID=12\n", dpkg=True, apk=True)
    assert purls(root) == {
        "pkg:deb/debian/libssl3@3.0.2-0ubuntu1.10?arch=amd64&distro=debian-12",
        "pkg:apk/alpine/musl@1.2.4_git20230717-r4?arch=x86_64",
        "pkg:apk/alpine/libcrypto3@3.1.4-r5?arch=x86_64",
        "pkg:apk/alpine/busybox@1.36.1-r15",
    }


def test_os_release_fallback_and_no_symlinks(tmp_path: Path) -> None:
    fallback = _tree(tmp_path / "a", None, apk=True)
    (fallback / "usr/lib").mkdir(parents=True)
    (fallback / "usr/lib/os-release").write_text("ID=alpine\nVERSION_ID=3.18.4\n")
    assert {p.release for p in inventory.from_tree(fallback).packages} == {"3.18.4"}
    # A symlinked os-release is not followed (it could name any file of this machine).
    linked = _tree(tmp_path / "b", None, apk=True)
    (tmp_path / "elsewhere").write_text("ID=alpine\nVERSION_ID=9.9\n")
    (linked / "etc").mkdir()
    (linked / "etc/os-release").symlink_to(tmp_path / "elsewhere")
    assert {p.release for p in inventory.from_tree(linked).packages} == {None}


# --- matching OS advisories ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ecosystem", "matches"),
    [
        pytest.param("Alpine:v3.19", True, id="same-release"),
        pytest.param("Alpine:v3.18", False, id="other-release"),
        pytest.param("Alpine", True, id="no-release"),
    ],
)
def test_alpine_packages_match_by_origin_and_release(
    write_db: WriteDb, tmp_path: Path, ecosystem: str, matches: bool
) -> None:
    db = write_db(
        advisory(
            "ALPINE-CVE-2024-0001",
            "openssl",
            ecosystem=ecosystem,
            events=[{"introduced": "0"}, {"fixed": "3.1.4-r6"}],
        ),
        advisory(
            "ALPINE-CVE-2024-0002",
            "musl",
            ecosystem=ecosystem,
            events=[{"introduced": "0"}, {"fixed": "1.2.4_git20230717-r4"}],  # already fixed
        ),
    )
    root = _tree(tmp_path / "rootfs", "ID=alpine\nVERSION_ID=3.19.1\n", apk=True)
    findings = OsvScanner(osv.parse_database(db)).scan(inventory.from_tree(root)).findings
    expected = {("libcrypto3", "ALPINE-CVE-2024-0001")} if matches else set()
    assert {(f.package, f.advisory_id) for f in findings} == expected
    assert all(f.fixed_versions == ("3.1.4-r6",) for f in findings)


@pytest.mark.parametrize(
    ("ecosystem", "matches"),
    [
        pytest.param("Ubuntu:22.04:LTS", True, id="lts-suffix"),
        pytest.param("Ubuntu:Pro:22.04:LTS", True, id="pro"),
        pytest.param("Ubuntu:20.04:LTS", False, id="other-release"),
    ],
)
def test_ubuntu_packages_match_by_release(
    write_db: WriteDb, tmp_path: Path, ecosystem: str, matches: bool
) -> None:
    db = write_db(
        advisory(
            "UBUNTU-CVE-2024-1",
            "openssl",
            ecosystem=ecosystem,
            events=[{"introduced": "0"}, {"fixed": "3.0.2-0ubuntu1.15"}],
        )
    )
    root = _tree(tmp_path / "rootfs", "ID=ubuntu\nVERSION_ID=22.04\n", dpkg=True)
    findings = OsvScanner(osv.parse_database(db)).scan(inventory.from_tree(root)).findings
    assert {f.package for f in findings} == ({"libssl3"} if matches else set())
