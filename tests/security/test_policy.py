"""The security policy: thresholds, unknown severity, the expiring allow-list, and errors that
name the malformed field."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from shipyard.errors import InvalidInput
from shipyard.security.cvss import Severity
from shipyard.security.policy import (
    DEFAULT_POLICY,
    PolicyError,
    SecurityPolicy,
    evaluate,
    load_policy,
    parse_policy,
)
from shipyard.security.scanning import Finding, Rating

TODAY = dt.date(2025, 6, 1)


def finding(
    adv_id: str, severity: Severity, *, package: str = "pkg", aliases: tuple[str, ...] = ()
) -> Finding:
    return Finding("PyPI", package, "1.0", adv_id, (adv_id,), aliases, Rating(severity))


SEVERITIES = {s: finding(f"A-{s.value}", s) for s in Severity}


def verdicts(policy: SecurityPolicy) -> dict[str, str]:
    ev = evaluate(policy, SEVERITIES.values(), today=TODAY)
    out = {f.severity.value: "block" for f in ev.blocking}
    out.update({f.severity.value: "pass" for f in ev.passed})
    return out


@pytest.mark.parametrize(
    ("data", "blocked"),
    [
        pytest.param(None, {"critical"}, id="default-blocks-critical"),
        pytest.param({"block": ["critical", "high"]}, {"critical", "high"}, id="block-list"),
        pytest.param({"block": ["CRITICAL"]}, {"critical"}, id="case-insensitive"),
        pytest.param({"block": []}, set(), id="block-nothing"),
        pytest.param({"max_severity": "medium"}, {"high", "critical"}, id="max-medium"),
        pytest.param(
            {"max_severity": "none"}, {"low", "medium", "high", "critical"}, id="max-none"
        ),
        pytest.param({"unknown": "block"}, {"critical", "unknown"}, id="unknown-blocks"),
    ],
)
def test_thresholds(data: dict[str, Any] | None, blocked: set[str]) -> None:
    result = verdicts(parse_policy(data))
    assert {s for s, v in result.items() if v == "block"} == blocked
    assert set(result) == {s.value for s in Severity}  # every finding is judged one way


def test_allow_entry_matches_any_alias_and_gives_its_reason() -> None:
    policy = parse_policy(
        {
            "allow": [
                {
                    "id": "cve-2021-42343",
                    "reason": "workers bind to localhost",
                    "expires": "2025-12-31",
                }
            ]
        }
    )
    crit = finding("PYSEC-2021-871", Severity.CRITICAL, aliases=("CVE-2021-42343",))
    ev = evaluate(policy, [crit], today=TODAY)
    assert not ev.blocked
    assert [(a.finding, a.reason) for a in ev.allowed] == [(crit, "workers bind to localhost")]
    assert ev.expired == ()


@pytest.mark.parametrize(
    ("today", "applies"),
    [
        pytest.param(dt.date(2025, 6, 29), True, id="before-expiry"),
        pytest.param(dt.date(2025, 6, 30), True, id="on-expiry-day"),
        pytest.param(dt.date(2025, 7, 1), False, id="day-after"),
    ],
)
def test_allow_entry_expiry(today: dt.date, applies: bool) -> None:
    policy = parse_policy(
        {"allow": [{"id": "A-1", "reason": "accepted", "expires": dt.date(2025, 6, 30)}]}
    )
    crit = finding("A-1", Severity.CRITICAL)
    ev = evaluate(policy, [crit], today=today)
    assert ev.blocked is not applies
    if applies:
        assert ev.expired == ()
    else:
        assert [(e.entry.id, e.matched) for e in ev.expired] == [("A-1", (crit,))]
        assert "expired allow entries: A-1 (expired 2025-06-30)" in ev.summary()


def test_allow_entry_scoped_to_a_package() -> None:
    policy = parse_policy(
        {"allow": [{"id": "CVE-1", "reason": "r", "expires": "2030-01-01", "package": "Foo_Bar"}]}
    )
    mine = finding("A-1", Severity.CRITICAL, package="foo-bar", aliases=("CVE-1",))
    other = finding("A-2", Severity.CRITICAL, package="other", aliases=("CVE-1",))
    ev = evaluate(policy, [mine, other], today=TODAY)
    assert [a.finding for a in ev.allowed] == [mine]
    assert ev.blocking == (other,)


def test_summary_counts_blocking_by_severity() -> None:
    policy = parse_policy({"block": ["critical", "high"]})
    ev = evaluate(
        policy,
        [finding("A", Severity.CRITICAL), finding("B", Severity.HIGH), finding("C", Severity.HIGH)],
        today=TODAY,
    )
    assert ev.summary().startswith("3 blocking finding(s) (1 critical, 2 high)")
    assert ev.to_dict()["blocked"] is True


@pytest.mark.parametrize(
    ("data", "field"),
    [
        pytest.param({"block": ["severe"]}, "block.0", id="unknown-severity-name"),
        pytest.param({"block": "critical"}, "block", id="block-not-a-list"),
        pytest.param({"unknown": "maybe"}, "unknown", id="unknown-mode"),
        pytest.param({"max_severity": "critical"}, "max_severity", id="max-critical-meaningless"),
        pytest.param({"blok": ["critical"]}, "blok", id="typo-field"),
        pytest.param(
            {"allow": [{"id": "X", "expires": "2030-01-01"}]},
            "allow.0.reason",
            id="reason-required",
        ),
        pytest.param(
            {"allow": [{"id": "X", "reason": "  ", "expires": "2030-01-01"}]},
            "allow.0.reason",
            id="reason-blank",
        ),
        pytest.param(
            {"allow": [{"id": "X", "reason": "r"}]}, "allow.0.expires", id="expiry-required"
        ),
        pytest.param(
            {"allow": [{"id": "X", "reason": "r", "expires": "soon"}]},
            "allow.0.expires",
            id="expiry-not-a-date",
        ),
        pytest.param(
            {"block": ["high"], "max_severity": "low"},
            "(policy): give either `block` or `max_severity`, not both",
            id="both-thresholds",
        ),
        pytest.param(
            {
                "allow": [
                    {"id": "X", "reason": "r", "expires": "2030-01-01"},
                    {"id": "x", "reason": "s", "expires": "2031-01-01"},
                ]
            },
            "allow: entry 1 (x) repeats entry 0",
            id="duplicate-entry",
        ),
    ],
)
def test_malformed_policy_names_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(data, origin="shipyard.toml [security]")
    assert isinstance(info.value, InvalidInput)
    assert info.value.message.startswith("shipyard.toml [security]: ")
    assert field in info.value.message


MANIFEST = """\
[service]
name = "hello"

[run]
command = "python app.py"

[security]
block = ["critical", "high"]
unknown = "block"

[[security.allow]]
id = "CVE-2021-42343"
reason = "LocalCluster is not used in production"
expires = 2025-12-31
"""


@pytest.mark.parametrize(
    ("name", "text"),
    [
        pytest.param("shipyard.toml", MANIFEST, id="manifest-security-table"),
        pytest.param(
            "policy.toml",
            'block = ["critical", "high"]\nunknown = "block"\n[[allow]]\nid = "CVE-2021-42343"\n'
            'reason = "LocalCluster is not used in production"\nexpires = 2025-12-31\n',
            id="bare-toml",
        ),
        pytest.param(
            "policy.json",
            '{"block": ["critical", "high"], "unknown": "block", '
            '"allow": [{"id": "CVE-2021-42343", '
            '"reason": "LocalCluster is not used in production", "expires": "2025-12-31"}]}',
            id="json",
        ),
        pytest.param(
            "policy.yaml",
            "security:\n  block: [critical, high]\n  unknown: block\n"
            "  allow:\n  - id: CVE-2021-42343\n"
            "    reason: LocalCluster is not used in production\n    expires: 2025-12-31\n",
            id="yaml",
        ),
    ],
)
def test_load_policy_files(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    policy = load_policy(path)
    assert policy.blocking_severities == {Severity.CRITICAL, Severity.HIGH}
    assert policy.unknown == "block"
    assert [(e.id, e.expires) for e in policy.allow] == [("CVE-2021-42343", dt.date(2025, 12, 31))]


def test_manifest_without_security_table_is_the_default(tmp_path: Path) -> None:
    path = tmp_path / "shipyard.toml"
    path.write_text('[service]\nname = "hello"\n[run]\ncommand = "python app.py"\n')
    assert load_policy(path) == DEFAULT_POLICY


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        pytest.param("p.toml", "block = [", "not valid toml", id="bad-toml"),
        pytest.param("p.json", "[1]", "must be a table/object", id="json-list"),
        pytest.param(
            "p.toml", "[security]\nblock = ['nope']\n", "[security]: block.0", id="bad-field"
        ),
    ],
)
def test_load_policy_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_policy(path)


@pytest.mark.parametrize(
    ("data", "severity", "status", "why"),
    [
        pytest.param(
            None,
            Severity.CRITICAL,
            "block",
            "critical is a blocking severity (policy blocks critical)",
            id="default-critical-blocks",
        ),
        pytest.param(
            None,
            Severity.HIGH,
            "report",
            "high is below the blocking threshold (policy blocks critical)",
            id="default-high-reported",
        ),
        pytest.param(
            {"block": []},
            Severity.CRITICAL,
            "report",
            "critical is below the blocking threshold (policy blocks nothing)",
            id="block-nothing",
        ),
        pytest.param(
            {"max_severity": "low"},
            Severity.MEDIUM,
            "block",
            "medium is a blocking severity (policy blocks medium, high, critical)",
            id="max-low",
        ),
        pytest.param(
            None,
            Severity.UNKNOWN,
            "report",
            'no usable severity; the policy reports those without blocking (unknown = "allow")',
            id="unknown-allowed",
        ),
        pytest.param(
            {"unknown": "block"},
            Severity.UNKNOWN,
            "block",
            "no usable severity, and the policy blocks unknown severity",
            id="unknown-blocks",
        ),
    ],
)
def test_every_verdict_says_why(
    data: dict[str, Any] | None, severity: Severity, status: str, why: str
) -> None:
    ev = evaluate(parse_policy(data), [SEVERITIES[severity]], today=TODAY)
    [verdict] = ev.verdicts()
    assert (verdict.status, verdict.why) == (status, why)
    assert verdict.blocking is (status == "block")
    listed = ev.to_dict()["blocking" if status == "block" else "passed"]
    assert [(f["advisory_id"], f["why"]) for f in listed] == [(f"A-{severity.value}", why)]


def test_allowed_verdict_names_the_entry_and_the_reason() -> None:
    policy = parse_policy(
        {
            "allow": [
                {"id": "A-critical", "reason": "reviewed: not reachable", "expires": "2099-01-01"}
            ]
        }
    )
    ev = evaluate(policy, [SEVERITIES[Severity.CRITICAL], SEVERITIES[Severity.HIGH]], today=TODAY)
    assert [(v.finding.advisory_id, v.status, v.why) for v in ev.verdicts()] == [
        (
            "A-critical",
            "allowed",
            "reviewed: not reachable (allow entry A-critical, until 2099-01-01)",
        ),
        ("A-high", "report", "high is below the blocking threshold (policy blocks critical)"),
    ]
