"""One contract, both ``Scanner``s: ``security.fake.FakeScanner`` and ``security.scanning
.OsvScanner`` over the real PyPA advisory database (shared/data/pypa-advisory-db).

The fake knows only the findings it is given; here it is given what the real scanner found in a
"universe" inventory (in another order, found at other paths), then both scan the inventories
below. The same assertions hold for both: which packages are vulnerable, merged aliases, severity
and fixes, worst first whatever the inventory order, each finding located where *this* inventory
found the package, nothing for a fixed version or an empty inventory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.security import osv
from shipyard.security.cvss import Severity
from shipyard.security.fake import FakeScanner
from shipyard.security.inventory import Inventory, Package
from shipyard.security.scanning import OsvScanner, Scanner
from tests.shared_data import find_pypa_db

#: Every package version the suite asks about, vulnerable or not.
UNIVERSE = (
    ("langchain", "0.0.170"),  # PYSEC-2023-151, critical 9.8, fixed in 0.0.171
    ("urllib3", "2.0.5"),  # PYSEC-2023-192, high 8.1, fixed in 2.0.6
    ("distributed", "2021.9.0"),  # PYSEC-2021-871 and -872: one CVE, one finding
    ("distributed", "2021.10.0"),
    ("requests", "2.32.3"),
    ("flask", "3.0.3"),
)


def inventory(*packages: tuple[str, str], at: str = "site") -> Inventory:
    return Inventory(
        "test",
        "tree",
        tuple(Package("PyPI", n, v, location=f"{at}/{n}-{v}.dist-info") for n, v in packages),
    )


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> OsvScanner:
    path = find_pypa_db()
    if path is None:  # shared project data, not optional: fail loudly
        pytest.fail("PyPA advisory database not found; set SHIPYARD_TEST_OSV_DB")
    return OsvScanner(osv.load(path, cache_dir=tmp_path_factory.mktemp("osv-cache")))


@pytest.fixture(params=["fake", "osv"])
def scanner(request: pytest.FixtureRequest, real: OsvScanner) -> Iterator[Scanner]:
    if request.param == "osv":
        yield real
        return
    known = real.scan(inventory(*UNIVERSE, at="elsewhere")).findings
    yield FakeScanner(reversed(known))


def test_vulnerable_packages_are_found_worst_first(scanner: Scanner) -> None:
    scanned = inventory(("flask", "3.0.3"), ("urllib3", "2.0.5"), ("langchain", "0.0.170"))

    result = scanner.scan(scanned)

    assert (result.scanner, result.inventory) == (scanner.name, scanned)
    assert {f.package for f in result.findings} == {"langchain", "urllib3"}
    assert result.vulnerable_packages == 2
    ranks = [f.severity.rank for f in result.findings]
    assert ranks == sorted(ranks, reverse=True)
    first = result.findings[0]
    assert (first.package, first.severity) == ("langchain", Severity.CRITICAL)
    assert "PYSEC-2023-151" in {f.advisory_id for f in result.findings}
    urllib3 = next(f for f in result.findings if f.advisory_id == "PYSEC-2023-192")
    assert (urllib3.severity, urllib3.score, urllib3.fixed_versions) == (
        Severity.HIGH,
        8.1,
        ("2.0.6",),
    )


def test_a_finding_is_located_where_this_inventory_found_the_package(
    scanner: Scanner,
) -> None:
    result = scanner.scan(inventory(("urllib3", "2.0.5"), at="app/deps"))

    assert result.findings
    assert {f.location for f in result.findings} == {"app/deps/urllib3-2.0.5.dist-info"}


def test_the_order_of_the_inventory_does_not_matter(scanner: Scanner) -> None:
    packages = [("urllib3", "2.0.5"), ("distributed", "2021.9.0"), ("langchain", "0.0.170")]

    forward = scanner.scan(inventory(*packages)).findings
    backward = scanner.scan(inventory(*reversed(packages))).findings

    assert [f.to_dict() for f in forward] == [f.to_dict() for f in backward]
    assert len(forward) >= 3


def test_advisories_about_one_cve_are_one_finding(scanner: Scanner) -> None:
    findings = scanner.scan(inventory(("distributed", "2021.9.0"))).findings

    cve = [f for f in findings if "CVE-2021-42343" in f.aliases]
    assert len(cve) == 1
    assert cve[0].advisory_ids == ("PYSEC-2021-871", "PYSEC-2021-872")
    assert cve[0].fixed_versions == ("2021.10.0",)


@pytest.mark.parametrize(
    "scanned",
    [
        pytest.param(inventory(("distributed", "2021.10.0")), id="fixed-version"),
        pytest.param(inventory(("requests", "2.32.3"), ("flask", "3.0.3")), id="clean-packages"),
        pytest.param(
            # The name and version of a vulnerable PyPI package, but a Debian package.
            Inventory("test", "tree", (Package("Debian", "urllib3", "2.0.5", release="12"),)),
            id="other-ecosystem",
        ),
        pytest.param(inventory(), id="empty"),
    ],
)
def test_nothing_is_found_where_nothing_is_known(scanner: Scanner, scanned: Inventory) -> None:
    result = scanner.scan(scanned)

    assert (result.findings, result.vulnerable_packages) == ((), 0)


@pytest.mark.parametrize(
    "packages",
    [
        pytest.param(UNIVERSE, id="universe"),
        pytest.param(UNIVERSE[::-1], id="reversed"),
        pytest.param((("urllib3", "2.0.5"), ("flask", "3.0.3")), id="subset"),
    ],
)
def test_the_fake_answers_what_the_real_scanner_answers(
    real: OsvScanner, packages: tuple[tuple[str, str], ...], tmp_path: Path
) -> None:
    fake = FakeScanner(reversed(real.scan(inventory(*UNIVERSE, at="elsewhere")).findings))
    scanned = inventory(*packages, at=str(tmp_path))

    expected, got = real.scan(scanned), fake.scan(scanned)

    assert got.findings == expected.findings
    assert got.vulnerable_packages == expected.vulnerable_packages
