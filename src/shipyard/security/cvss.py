"""CVSS v3.0 / v3.1 base scores computed from the vector string, and severity bands.

Formulas and constants are those of the FIRST specification (v3.1 section 7.1 and Appendix A;
v3.0 section 8.1). The two versions differ only in ``Roundup``: v3.1 defines it on integers to
avoid floating-point artefacts (``Roundup(4.000000000000001)`` is 4.0, not 4.1).

Used by ``scanning.py`` to rate each advisory; the policy (``policy.py``) blocks by band. A vector
we cannot compute (CVSS v2, v4, or malformed) yields no score: the advisory's severity is then
``unknown`` unless the database states a band itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum


class Severity(StrEnum):
    """Severity bands of CVSS v3 (qualitative rating scale) plus ``unknown``."""

    NONE = "none"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"
    UNKNOWN = "unknown"

    @property
    def rank(self) -> int:
        """Order for comparisons; ``unknown`` ranks below everything (it is handled apart)."""
        return _RANK[self]


_RANK = {
    Severity.UNKNOWN: -1,
    Severity.NONE: 0,
    Severity.LOW: 1,
    Severity.MEDIUM: 2,
    Severity.HIGH: 3,
    Severity.CRITICAL: 4,
}


def band(score: float) -> Severity:
    """CVSS v3 rating: 0 none, 0.1-3.9 low, 4.0-6.9 medium, 7.0-8.9 high, 9.0+ critical."""
    if not 0.0 <= score <= 10.0:
        raise ValueError(f"CVSS score {score} outside 0.0-10.0")
    if score == 0.0:
        return Severity.NONE
    if score < 4.0:
        return Severity.LOW
    if score < 7.0:
        return Severity.MEDIUM
    if score < 9.0:
        return Severity.HIGH
    return Severity.CRITICAL


class CvssError(ValueError):
    """A vector string that is not a valid CVSS v3.0/v3.1 base vector."""


_WEIGHTS: dict[str, dict[str, float]] = {
    "AV": {"N": 0.85, "A": 0.62, "L": 0.55, "P": 0.2},
    "AC": {"L": 0.77, "H": 0.44},
    "PR": {"N": 0.85, "L": 0.62, "H": 0.27},  # scope unchanged; changed: L 0.68, H 0.5
    "UI": {"N": 0.85, "R": 0.62},
    "S": {"U": 0.0, "C": 0.0},
    "C": {"H": 0.56, "L": 0.22, "N": 0.0},
    "I": {"H": 0.56, "L": 0.22, "N": 0.0},
    "A": {"H": 0.56, "L": 0.22, "N": 0.0},
}
_PR_SCOPE_CHANGED = {"N": 0.85, "L": 0.68, "H": 0.5}
BASE_METRICS = tuple(_WEIGHTS)
#: Temporal and environmental metrics: allowed in a vector, not part of the base score.
_OTHER_METRICS: dict[str, frozenset[str]] = {
    "E": frozenset("XUPFH"),
    "RL": frozenset("XOTWU"),
    "RC": frozenset("XURC"),
    **{m: frozenset("XLMH") for m in ("CR", "IR", "AR")},
    "MAV": frozenset("XNALP"),
    "MAC": frozenset("XLH"),
    "MPR": frozenset("XNLH"),
    "MUI": frozenset("XNR"),
    "MS": frozenset("XUC"),
    **{m: frozenset("XNLH") for m in ("MC", "MI", "MA")},
}


def roundup(value: float, version: str = "3.1") -> float:
    """The spec's Roundup: smallest number with one decimal place >= value."""
    if version == "3.0":
        return math.ceil(value * 10) / 10
    int_input = round(value * 100_000)
    if int_input % 10_000 == 0:
        return int_input / 100_000.0
    return (math.floor(int_input / 10_000) + 1) / 10.0


@dataclass(frozen=True)
class CvssScore:
    vector: str
    version: str  # "3.0" or "3.1"
    base_score: float
    severity: Severity


def parse_vector(vector: str) -> tuple[str, dict[str, str]]:
    """Split and validate ``CVSS:3.x/AV:N/...``: every base metric exactly once, known values."""
    parts = vector.strip().split("/")
    head = parts[0]
    if head not in ("CVSS:3.0", "CVSS:3.1"):
        raise CvssError(f"{vector!r}: not a CVSS v3.0/v3.1 vector (starts with {head!r})")
    version = head.removeprefix("CVSS:")
    metrics: dict[str, str] = {}
    for part in parts[1:]:
        name, sep, value = part.partition(":")
        if not sep:
            raise CvssError(f"{vector!r}: {part!r} is not METRIC:VALUE")
        if name in metrics:
            raise CvssError(f"{vector!r}: metric {name} given twice")
        allowed = _WEIGHTS[name].keys() if name in _WEIGHTS else _OTHER_METRICS.get(name)
        if allowed is None:
            raise CvssError(f"{vector!r}: unknown metric {name}")
        if value not in allowed:
            raise CvssError(f"{vector!r}: {name}:{value} is not a valid value")
        metrics[name] = value
    missing = [m for m in BASE_METRICS if m not in metrics]
    if missing:
        raise CvssError(f"{vector!r}: missing base metric(s) {', '.join(missing)}")
    return version, metrics


def base_score(vector: str) -> CvssScore:
    """The CVSS v3 base score of ``vector`` (CvssError when it is not a valid v3 vector)."""
    version, m = parse_vector(vector)
    changed = m["S"] == "C"
    iss = 1 - (1 - _WEIGHTS["C"][m["C"]]) * (1 - _WEIGHTS["I"][m["I"]]) * (
        1 - _WEIGHTS["A"][m["A"]]
    )
    impact = 7.52 * (iss - 0.029) - 3.25 * (iss - 0.02) ** 15 if changed else 6.42 * iss
    pr = (_PR_SCOPE_CHANGED if changed else _WEIGHTS["PR"])[m["PR"]]
    exploitability = (
        8.22 * _WEIGHTS["AV"][m["AV"]] * _WEIGHTS["AC"][m["AC"]] * pr * _WEIGHTS["UI"][m["UI"]]
    )
    if impact <= 0:
        score = 0.0
    elif changed:
        score = roundup(min(1.08 * (impact + exploitability), 10.0), version)
    else:
        score = roundup(min(impact + exploitability, 10.0), version)
    return CvssScore(vector.strip(), version, score, band(score))


def try_base_score(vector: str) -> CvssScore | None:
    try:
        return base_score(vector)
    except CvssError:
        return None
