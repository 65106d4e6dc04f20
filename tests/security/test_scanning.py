"""The OSV scanner: matching inventories against advisories, merging aliases into one finding,
rating severity, and listing fixed versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shipyard.security import inventory, osv
from shipyard.security.cvss import Severity
from shipyard.security.inventory import Inventory, Package
from shipyard.security.scanning import OsvScanner, rate

from .conftest import WriteDb, advisory, debian_root

CRITICAL = [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}]  # 9.8
MEDIUM = [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:C/C:L/I:L/A:N"}]  # 6.1


def inv(*packages: tuple[str, str]) -> Inventory:
    return Inventory("test", "requirements", tuple(Package("PyPI", n, v) for n, v in packages))


def scan(
    db_root: Path, *packages: tuple[str, str]
) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    result = OsvScanner(osv.parse_database(db_root)).scan(inv(*packages))
    return [(f.package, f.advisory_ids, f.aliases) for f in result.findings]


ALL = [{"introduced": "0"}]


def test_advisory_and_its_alias_are_one_finding(write_db: WriteDb) -> None:
    root = write_db(
        advisory("PYSEC-1", "pkg", events=ALL, aliases=["CVE-2024-1"]),
        advisory("GHSA-aaaa", "pkg", events=ALL, aliases=["CVE-2024-1", "PYSEC-1"]),
    )
    assert scan(root, ("pkg", "1.0")) == [("pkg", ("GHSA-aaaa", "PYSEC-1"), ("CVE-2024-1",))]


def test_aliases_merge_transitively(write_db: WriteDb) -> None:
    # A~B share a CVE, B~C share a GHSA id: one vulnerability under three records.
    root = write_db(
        advisory("PYSEC-1", "pkg", events=ALL, aliases=["CVE-1"]),
        advisory("PYSEC-3", "pkg", events=ALL, aliases=["GHSA-x"]),
        advisory("PYSEC-2", "pkg", events=ALL, aliases=["CVE-1", "GHSA-x"]),
    )
    assert scan(root, ("pkg", "1.0")) == [
        ("pkg", ("PYSEC-1", "PYSEC-2", "PYSEC-3"), ("CVE-1", "GHSA-x"))
    ]


def test_unrelated_advisories_stay_apart(write_db: WriteDb) -> None:
    root = write_db(
        advisory("PYSEC-1", "pkg", events=ALL, aliases=["CVE-1"]),
        advisory("PYSEC-2", "pkg", events=ALL, aliases=["CVE-2"]),
        advisory("PYSEC-3", "other", events=ALL, aliases=["CVE-1"]),
    )
    found = scan(root, ("pkg", "1.0"), ("other", "2.0"))
    assert sorted(found) == [
        ("other", ("PYSEC-3",), ("CVE-1",)),
        ("pkg", ("PYSEC-1",), ("CVE-1",)),
        ("pkg", ("PYSEC-2",), ("CVE-2",)),
    ]


def test_only_affected_versions_are_found(write_db: WriteDb) -> None:
    root = write_db(advisory("PYSEC-1", "pkg", events=[{"introduced": "0"}, {"fixed": "2.0"}]))
    assert scan(root, ("pkg", "2.0")) == []
    assert scan(root, ("pkg", "1.9")) != []
    assert scan(root, ("other", "1.0")) == []


def test_merged_finding_takes_the_highest_severity_and_all_fixes(write_db: WriteDb) -> None:
    root = write_db(
        advisory(
            "PYSEC-1",
            "pkg",
            events=[{"introduced": "0"}, {"fixed": "1.5"}],
            aliases=["CVE-1"],
            severity=MEDIUM,
        ),
        advisory(
            "GHSA-1",
            "pkg",
            events=[{"introduced": "0"}, {"fixed": "1.4.2"}],
            aliases=["CVE-1"],
            severity=CRITICAL,
        ),
    )
    (finding,) = OsvScanner(osv.parse_database(root)).scan(inv(("pkg", "1.0"))).findings
    assert (finding.severity, finding.score) == (Severity.CRITICAL, 9.8)
    assert finding.fixed_versions == ("1.4.2", "1.5")
    assert finding.ids == {"PYSEC-1", "GHSA-1", "CVE-1"}


@pytest.mark.parametrize(
    ("extra", "severity", "score", "source"),
    [
        pytest.param({"severity": CRITICAL}, Severity.CRITICAL, 9.8, "cvss", id="cvss-v3"),
        pytest.param(
            {"severity": [{"type": "CVSS_V2", "score": "AV:N/AC:L/Au:N/C:P/I:P/A:P"}]},
            Severity.UNKNOWN,
            None,
            "none",
            id="cvss-v2-only",
        ),
        pytest.param(
            {
                "severity": [
                    {
                        "type": "CVSS_V4",
                        "score": "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N",
                    }
                ]
            },
            Severity.UNKNOWN,
            None,
            "none",
            id="cvss-v4-only",
        ),
        pytest.param(
            {"severity": [{"type": "CVSS_V3", "score": "CVSS:3.1/garbage"}]},
            Severity.UNKNOWN,
            None,
            "none",
            id="malformed-vector",
        ),
        pytest.param(
            {"database_specific": {"severity": "MODERATE"}},
            Severity.MEDIUM,
            None,
            "database",
            id="ghsa-stated-band",
        ),
        pytest.param({}, Severity.UNKNOWN, None, "none", id="no-severity"),
    ],
)
def test_rating(
    write_db: WriteDb, extra: dict[str, Any], severity: Severity, score: float | None, source: str
) -> None:
    db = osv.parse_database(write_db(advisory("A-1", "pkg", events=ALL, **extra)))
    rating = rate(db.advisories[0])
    assert (rating.severity, rating.score, rating.source) == (severity, score, source)


@pytest.mark.parametrize(
    ("ecosystem", "matches"),
    [
        pytest.param("Debian:12", True, id="same-release"),
        pytest.param("Debian:11", False, id="other-release"),
    ],
)
def test_debian_packages_match_by_source_package_and_release(
    write_db: WriteDb, tmp_path: Path, ecosystem: str, matches: bool
) -> None:
    root = write_db(
        advisory(
            "DSA-1",
            "openssl",
            ecosystem=ecosystem,
            events=[{"introduced": "0"}, {"fixed": "3.0.13-1~deb12u1"}],
        )
    )
    tree = inventory.from_tree(debian_root(tmp_path / "rootfs"))
    findings = OsvScanner(osv.parse_database(root)).scan(tree).findings
    expected = (
        {("libssl3", "3.0.11-1~deb12u2"), ("openssl", "3.0.11-1~deb12u2")} if matches else set()
    )
    assert {(f.package, f.version) for f in findings} == expected
    assert all(f.fixed_versions == ("3.0.13-1~deb12u1",) for f in findings)


# --- the real PyPA database -----------------------------------------------------------------------


def test_real_duplicate_pysec_records_are_one_finding(pypa_db: osv.OsvDatabase) -> None:
    # PYSEC-2021-871 and PYSEC-2021-872 both describe CVE-2021-42343 in dask distributed.
    findings = OsvScanner(pypa_db).scan(inv(("distributed", "2021.9.0"))).findings
    cve = [f for f in findings if "CVE-2021-42343" in f.aliases]
    assert len(cve) == 1
    assert cve[0].advisory_ids == ("PYSEC-2021-871", "PYSEC-2021-872")
    assert {"GHSA-hwqr-f3v9-hwxr", "GHSA-j8fq-86c5-5v2r"} <= set(cve[0].aliases)
    assert cve[0].fixed_versions == ("2021.10.0",)
    assert not OsvScanner(pypa_db).scan(inv(("distributed", "2021.10.0"))).findings


def test_real_environment_scan(pypa_db: osv.OsvDatabase) -> None:
    result = OsvScanner(pypa_db).scan(
        inv(
            ("langchain", "0.0.170"),
            ("urllib3", "2.0.5"),
            ("requests", "2.32.3"),
            ("flask", "3.0.3"),
        )
    )
    by_pkg: dict[str, list[str]] = {}
    for f in result.findings:
        by_pkg.setdefault(f.package, []).append(f.advisory_id)
    assert set(by_pkg) == {"langchain", "urllib3"}
    assert "PYSEC-2023-151" in by_pkg["langchain"]  # critical 9.8, fixed in 0.0.171
    first = result.findings[0]
    assert (first.package, first.severity) == ("langchain", Severity.CRITICAL)  # sorted worst first
    urllib3 = next(f for f in result.findings if f.advisory_id == "PYSEC-2023-192")
    assert (urllib3.severity, urllib3.score) == (Severity.HIGH, 8.1)
    assert urllib3.fixed_versions == ("2.0.6",)
    assert result.vulnerable_packages == 2
