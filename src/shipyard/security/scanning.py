"""Vulnerability scanning: an inventory in, findings out.

``Scanner`` is the plug-point (DESIGN.md); ``OsvScanner`` checks every package of an
``Inventory`` against an offline ``OsvDatabase``, and ``fake.FakeScanner`` returns canned findings
for tests of callers. Advisories about the same package version that share an id or alias (a
PYSEC entry and the GHSA or second PYSEC entry for the same CVE) become one ``Finding`` whose ids
are the union, so one CVE is counted and allow-listed once.

Each finding carries its severity: the highest CVSS v3 base score among the advisories merged into
it (``cvss.py``), else the band the database states (GHSA's ``database_specific.severity``), else
``unknown``. Pure CPU work; the gate runs it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from shipyard.security import cvss, osv
from shipyard.security import versions as ordering
from shipyard.security.cvss import Severity
from shipyard.security.inventory import ALPINE, OS_ECOSYSTEMS, Inventory, Package

_DATABASE_BANDS = {
    "LOW": Severity.LOW,
    "MODERATE": Severity.MEDIUM,
    "MEDIUM": Severity.MEDIUM,
    "HIGH": Severity.HIGH,
    "CRITICAL": Severity.CRITICAL,
}


@dataclass(frozen=True)
class Rating:
    severity: Severity
    score: float | None = None
    vector: str | None = None
    #: "cvss" (computed from the vector), "database" (the band the advisory states) or "none".
    source: str = "none"


UNRATED = Rating(Severity.UNKNOWN)


def rate(advisory: osv.Advisory) -> Rating:
    """The advisory's severity: the highest computable CVSS v3 score, else the stated band."""
    best: Rating | None = None
    for entry in advisory.severity:
        if entry.type != "CVSS_V3":
            continue  # CVSS v2 / v4 vectors: not computed here
        score = cvss.try_base_score(entry.score)
        if score is not None and (best is None or (best.score or 0.0) < score.base_score):
            best = Rating(score.severity, score.base_score, score.vector, "cvss")
    if best is not None:
        return best
    stated = _DATABASE_BANDS.get((advisory.database_severity or "").upper())
    return Rating(stated, source="database") if stated else UNRATED


def _stronger(a: Rating, b: Rating) -> Rating:
    key_a = (a.severity.rank, a.score if a.score is not None else -1.0)
    key_b = (b.severity.rank, b.score if b.score is not None else -1.0)
    return b if key_b > key_a else a


@dataclass(frozen=True)
class Finding:
    """One vulnerability of one package version (merged over aliases)."""

    ecosystem: str
    package: str
    version: str
    advisory_id: str  # the representative advisory id (lowest of the merged database ids)
    #: Every advisory id merged into this finding (database ids, e.g. two PYSEC entries).
    advisory_ids: tuple[str, ...]
    aliases: tuple[str, ...]  # every other identifier (CVE, GHSA, ...), sorted
    rating: Rating
    fixed_versions: tuple[str, ...] = ()
    summary: str = ""
    location: str = ""

    @property
    def severity(self) -> Severity:
        return self.rating.severity

    @property
    def score(self) -> float | None:
        return self.rating.score

    @property
    def ids(self) -> frozenset[str]:
        """All names this vulnerability goes by: what an allow-list entry may name."""
        return frozenset((*self.advisory_ids, *self.aliases))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ecosystem": self.ecosystem,
            "package": self.package,
            "version": self.version,
            "advisory_id": self.advisory_id,
            "advisory_ids": list(self.advisory_ids),
            "aliases": list(self.aliases),
            "severity": self.severity.value,
            "score": self.score,
            "vector": self.rating.vector,
            "severity_source": self.rating.source,
            "fixed_versions": list(self.fixed_versions),
            "summary": self.summary,
        }


@dataclass(frozen=True)
class ScanResult:
    scanner: str
    inventory: Inventory
    findings: tuple[Finding, ...]
    duration_seconds: float = 0.0
    database: osv.DatabaseStats | None = field(default=None, compare=False)

    @property
    def vulnerable_packages(self) -> int:
        return len({(f.ecosystem, f.package, f.version) for f in self.findings})


class Scanner(Protocol):
    """Turns an inventory into findings; never raises for a vulnerable package."""

    @property
    def name(self) -> str: ...

    def scan(self, inventory: Inventory) -> ScanResult: ...


def merge_aliases(
    package: Package, matches: Sequence[tuple[osv.Advisory, osv.Affected]]
) -> list[Finding]:
    """Group the advisories matching one package version by shared ids/aliases."""
    groups: list[list[tuple[osv.Advisory, osv.Affected]]] = []
    group_ids: list[set[str]] = []
    for match in matches:
        ids = set(match[0].ids)
        touching = [i for i, g in enumerate(group_ids) if g & ids]
        merged = [match]
        for i in reversed(touching):  # reversed: indices stay valid while popping
            merged.extend(groups.pop(i))
            ids |= group_ids.pop(i)
        groups.append(merged)
        group_ids.append(ids)
    findings = []
    for group, ids in zip(groups, group_ids, strict=True):
        db_ids = sorted({adv.id for adv, _ in group}, key=_natural)
        rating = UNRATED
        fixed: dict[str, None] = {}
        for adv, aff in group:
            rating = _stronger(rating, rate(adv))
            fixed.update(dict.fromkeys(aff.fixed_above(_match_version(package))))
        primary = next(adv for adv, _ in group if adv.id == db_ids[0])
        findings.append(
            Finding(
                ecosystem=package.ecosystem,
                package=package.name,
                version=package.version,
                advisory_id=db_ids[0],
                advisory_ids=tuple(db_ids),
                aliases=tuple(sorted(ids - set(db_ids), key=_natural)),
                rating=rating,
                fixed_versions=tuple(_sort_versions(package.ecosystem, fixed)),
                summary=primary.summary,
                location=package.location,
            )
        )
    return findings


def worst_first(finding: Finding) -> tuple[Any, ...]:
    """The order scan results are reported in: highest severity first, then package, version and
    advisory id (so PYSEC-2021-99 comes before PYSEC-2021-100)."""
    return (-finding.severity.rank, finding.package, finding.version, _natural(finding.advisory_id))


def _natural(text: str) -> tuple[Any, ...]:
    # PYSEC-2021-99 before PYSEC-2021-100: numbers compare as numbers.
    parts: list[Any] = []
    for chunk in text.replace("_", "-").split("-"):
        parts.append((0, int(chunk), "") if chunk.isdigit() else (1, 0, chunk))
    return tuple(parts)


def _sort_versions(ecosystem: str, found: Iterable[str]) -> list[str]:
    items = list(found)
    parse = ordering.ordering_for(ecosystem)
    if parse is None:
        return items
    keyed = [(k, v) for v in items if (k := parse(v)) is not None]
    if len(keyed) != len(items):
        return items
    try:
        return [v for _, v in sorted(keyed, key=lambda kv: kv[0])]
    except TypeError:
        return items


def _match_name(package: Package) -> str:
    # OSV's Debian, Ubuntu and Alpine advisories are about source packages ("openssl", not
    # "libssl3"; apk's origin).
    if package.ecosystem in OS_ECOSYSTEMS:
        return package.source_name or package.name
    return package.name


def _match_version(package: Package) -> str:
    if package.ecosystem in OS_ECOSYSTEMS:
        return package.source_version or package.version
    return package.version


def osv_release(package: Package) -> str | None:
    """The release as OSV writes it after the ecosystem: ``12`` (``Debian:12``), ``22.04``
    (``Ubuntu:22.04:LTS``), ``v3.19`` (``Alpine:v3.19``, from os-release's ``3.19.1``)."""
    if package.release is None:
        return None
    if package.ecosystem == ALPINE:
        major_minor = ".".join(package.release.split(".")[:2])
        return f"v{major_minor}"
    return package.release


def _release_matches(package: Package, affected: osv.Affected) -> bool:
    # "Ubuntu:22.04:LTS" / "Ubuntu:Pro:18.04:LTS": the release is the part that looks like one.
    _, sep, rest = affected.ecosystem.partition(":")
    ours = osv_release(package)
    if not (sep and rest and ours):
        return True  # the advisory or the package names no release: it applies to all
    return ours in rest.split(":")


class OsvScanner:
    """The offline OSV scanner."""

    name = "osv"

    def __init__(self, database: osv.OsvDatabase) -> None:
        self.database = database

    def findings_for(self, package: Package) -> list[Finding]:
        version = _match_version(package)
        matches = [
            (adv, aff)
            for adv, aff in self.database.lookup(package.ecosystem, _match_name(package))
            if _release_matches(package, aff) and aff.contains(version)
        ]
        return merge_aliases(package, matches) if matches else []

    def scan(self, inventory: Inventory) -> ScanResult:
        started = time.perf_counter()
        findings: list[Finding] = []
        for package in inventory.packages:
            findings.extend(self.findings_for(package))
        findings.sort(key=worst_first)
        return ScanResult(
            scanner=self.name,
            inventory=inventory,
            findings=tuple(findings),
            duration_seconds=time.perf_counter() - started,
            database=self.database.stats(),
        )
