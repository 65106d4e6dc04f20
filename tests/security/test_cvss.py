"""CVSS v3 base scores against the worked examples of FIRST's "CVSS v3.1 Examples" document,
the Roundup rule, severity bands, and rejection of vectors that are not CVSS v3."""

from __future__ import annotations

import pytest

from shipyard.security import cvss, osv
from shipyard.security.cvss import Severity

# (vector without prefix, score, example name) from FIRST's CVSS v3.1 examples.
SPEC_EXAMPLES = [
    ("AV:N/AC:L/PR:N/UI:R/S:C/C:L/I:L/A:N", 6.1, "CVE-2013-1937-phpmyadmin-xss"),
    ("AV:N/AC:L/PR:L/UI:N/S:C/C:L/I:L/A:N", 6.4, "CVE-2013-0375-mysql-sqli"),
    ("AV:N/AC:H/PR:N/UI:R/S:U/C:L/I:N/A:N", 3.1, "CVE-2014-3566-poodle"),
    ("AV:N/AC:L/PR:L/UI:N/S:C/C:H/I:H/A:H", 9.9, "CVE-2012-1516-vmware-escape"),
    ("AV:L/AC:L/PR:H/UI:N/S:U/C:L/I:L/A:L", 4.2, "CVE-2009-0783-tomcat"),
    ("AV:N/AC:L/PR:L/UI:N/S:U/C:H/I:H/A:H", 8.8, "CVE-2012-0384-cisco-ios"),
    ("AV:L/AC:L/PR:N/UI:R/S:U/C:H/I:H/A:H", 7.8, "CVE-2015-1098-iwork"),
    ("AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N", 7.5, "CVE-2014-0160-heartbleed"),
    ("AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", 9.8, "CVE-2014-6271-shellshock"),
    ("AV:N/AC:H/PR:N/UI:N/S:C/C:N/I:H/A:N", 6.8, "CVE-2008-1447-dns-kaminsky"),
    ("AV:P/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", 6.8, "CVE-2014-2005-sophos"),
    ("AV:N/AC:L/PR:N/UI:N/S:C/C:L/I:N/A:N", 5.8, "CVE-2010-0467-joomla"),
    ("AV:A/AC:L/PR:N/UI:N/S:C/C:H/I:N/A:H", 9.3, "CVE-2013-6014-juniper-arp"),
    ("AV:N/AC:L/PR:L/UI:R/S:C/C:L/I:L/A:N", 5.4, "CVE-2014-9253-dokuwiki"),
    ("AV:A/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", 8.8, "CVE-2011-1265-bluetooth"),
    ("AV:P/AC:L/PR:N/UI:N/S:U/C:N/I:H/A:N", 4.6, "CVE-2014-2019-ios"),
    ("AV:N/AC:H/PR:N/UI:N/S:U/C:H/I:H/A:N", 7.4, "CVE-2014-0224-openssl-ccs"),
    ("AV:N/AC:L/PR:N/UI:R/S:C/C:H/I:H/A:H", 9.6, "CVE-2012-5376-chrome-sandbox"),
    ("AV:N/AC:H/PR:N/UI:N/S:U/C:N/I:N/A:L", 3.7, "CVE-2004-0230-tcp-rst"),
    ("AV:N/AC:L/PR:N/UI:N/S:C/C:H/I:H/A:H", 10.0, "max-capped-at-10"),
    ("AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:N", 0.0, "no-impact-is-zero"),
]


@pytest.mark.parametrize("version", ["3.0", "3.1"])
@pytest.mark.parametrize(
    ("vector", "score"), [pytest.param(v, s, id=n) for v, s, n in SPEC_EXAMPLES]
)
def test_spec_examples(vector: str, score: float, version: str) -> None:
    result = cvss.base_score(f"CVSS:{version}/{vector}")
    assert result.base_score == score
    assert result.version == version
    assert result.severity is cvss.band(score)


def test_temporal_metrics_do_not_change_the_base_score() -> None:
    base = "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"
    assert cvss.base_score(base + "/E:U/RL:O/RC:R/CR:H/MAV:L").base_score == 9.8


@pytest.mark.parametrize(
    ("value", "version", "expected"),
    [
        pytest.param(4.02, "3.1", 4.1, id="spec-4.02"),
        pytest.param(4.00, "3.1", 4.0, id="spec-4.00"),
        # Floating-point noise: v3.1's integer Roundup absorbs it, v3.0's ceil does not.
        pytest.param(4.000000000000001, "3.1", 4.0, id="v31-ignores-float-noise"),
        pytest.param(4.000000000000001, "3.0", 4.1, id="v30-ceil"),
        pytest.param(9.91, "3.1", 10.0, id="up-to-ten"),
    ],
)
def test_roundup(value: float, version: str, expected: float) -> None:
    assert cvss.roundup(value, version) == expected


@pytest.mark.parametrize(
    ("score", "severity"),
    [
        (0.0, Severity.NONE),
        (0.1, Severity.LOW),
        (3.9, Severity.LOW),
        (4.0, Severity.MEDIUM),
        (6.9, Severity.MEDIUM),
        (7.0, Severity.HIGH),
        (8.9, Severity.HIGH),
        (9.0, Severity.CRITICAL),
        (10.0, Severity.CRITICAL),
    ],
    ids=lambda v: str(v),
)
def test_bands(score: float, severity: Severity) -> None:
    assert cvss.band(score) is severity


@pytest.mark.parametrize(
    ("vector", "message"),
    [
        pytest.param("AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", "not a CVSS v3", id="no-prefix"),
        pytest.param("AV:N/AC:L/Au:N/C:P/I:P/A:P", "not a CVSS v3", id="cvss-v2"),
        pytest.param(
            "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N",
            "not a CVSS v3",
            id="cvss-v4",
        ),
        pytest.param(
            "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H",
            "missing base metric(s) A",
            id="missing-metric",
        ),
        pytest.param(
            "CVSS:3.1/AV:N/AV:L/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", "given twice", id="duplicate"
        ),
        pytest.param(
            "CVSS:3.1/AV:X/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", "AV:X is not a valid", id="bad-value"
        ),
        pytest.param(
            "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H/ZZ:1",
            "unknown metric ZZ",
            id="unknown-metric",
        ),
        pytest.param("CVSS:3.1/AV", "not METRIC:VALUE", id="truncated"),
    ],
)
def test_invalid_vectors(vector: str, message: str) -> None:
    with pytest.raises(cvss.CvssError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cvss.base_score(vector)
    assert cvss.try_base_score(vector) is None


def test_every_cvss_v3_vector_in_the_pypa_db_computes(pypa_db: osv.OsvDatabase) -> None:
    vectors = [s.score for a in pypa_db.advisories for s in a.severity if s.type == "CVSS_V3"]
    assert len(vectors) >= 150  # SOURCE.md: about 200 advisories carry one
    scores = [cvss.base_score(v) for v in vectors]
    assert all(0.0 <= s.base_score <= 10.0 for s in scores)
    assert {s.severity for s in scores} >= {Severity.CRITICAL, Severity.HIGH, Severity.MEDIUM}
