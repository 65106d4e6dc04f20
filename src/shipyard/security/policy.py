"""The security policy: which findings block a deployment, and the reviewed exceptions.

Read from the manifest's ``[security]`` table or the server configuration (same shape), or from a
policy file given to ``shipyard scan --policy``::

    [security]
    block = ["critical", "high"]   # severities that block; default ["critical"] (ADR-014 §9)
    # max_severity = "medium"      # alternative to `block`: anything above this blocks
    unknown = "allow"              # no usable severity: "allow" (reported only) or "block"

    [[security.allow]]             # a reviewed exception: matches the finding's id or any alias
    id = "CVE-2021-42343"
    reason = "workers bind to localhost only in our deployment"
    expires = 2025-06-30           # last day it applies; afterwards it stops and the report says so

``evaluate`` splits findings into blocking, allowed (with the entry that allowed them) and
passing, and lists expired allow entries. Malformed policy: ``PolicyError`` naming the field.
"""

from __future__ import annotations

import datetime as dt
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shipyard.errors import InvalidInput
from shipyard.security.cvss import Severity
from shipyard.security.inventory import normalize_name
from shipyard.security.scanning import Finding

BlockingSeverity = Literal["low", "medium", "high", "critical"]
_BANDS: tuple[BlockingSeverity, ...] = ("low", "medium", "high", "critical")


class PolicyError(InvalidInput):
    """The security policy is malformed; the message names the field."""

    code = "invalid_security_policy"


class AllowEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    id: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        description="Advisory id or alias (PYSEC-..., GHSA-..., CVE-...)."
    )
    reason: Annotated[str, Field(min_length=1, max_length=2000)] = Field(
        description="Why the risk is accepted: reviewed, written down, required."
    )
    expires: dt.date = Field(description="Last day the exception applies (inclusive).")
    package: str | None = Field(
        default=None, max_length=200, description="Limit the exception to one package (optional)."
    )

    def expired(self, today: dt.date) -> bool:
        return today > self.expires

    def matches(self, finding: Finding) -> bool:
        if self.id.upper() not in {i.upper() for i in finding.ids}:
            return False
        return self.package is None or _same_package(self.package, finding.package)


def _same_package(a: str, b: str) -> bool:
    return normalize_name(a) == normalize_name(b)


class SecurityPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block: list[BlockingSeverity] | None = Field(
        default=None, description='Severities that block, e.g. ["critical", "high"].'
    )
    max_severity: Literal["none", "low", "medium", "high"] | None = Field(
        default=None, description="Highest severity tolerated; anything above blocks."
    )
    unknown: Literal["allow", "block"] = Field(
        default="allow",
        description="Findings whose advisories carry no usable severity: report only, or block.",
    )
    allow: list[AllowEntry] = Field(
        default_factory=list,
        description="Accepted risks, each an `[[security.allow]]` table with an expiry date; "
        "an expired entry blocks again and is reported as expired.",
    )

    @field_validator("block", mode="before")
    @classmethod
    def _lowercase(cls, v: Any) -> Any:
        if isinstance(v, str):
            raise ValueError('must be a list of severities, e.g. ["critical", "high"]')
        if isinstance(v, list):
            return [s.lower() if isinstance(s, str) else s for s in v]
        return v

    @field_validator("allow")
    @classmethod
    def _no_duplicates(cls, v: list[AllowEntry]) -> list[AllowEntry]:
        seen: dict[tuple[str, str | None], int] = {}
        for i, entry in enumerate(v):
            key = (entry.id.upper(), entry.package)
            if key in seen:
                raise ValueError(f"entry {i} ({entry.id}) repeats entry {seen[key]}")
            seen[key] = i
        return v

    @model_validator(mode="after")
    def _one_threshold(self) -> SecurityPolicy:
        if self.block is not None and self.max_severity is not None:
            raise ValueError("give either `block` or `max_severity`, not both")
        return self

    @property
    def blocking_severities(self) -> frozenset[Severity]:
        if self.block is not None:
            return frozenset(Severity(s) for s in self.block)
        if self.max_severity is not None:
            limit = Severity(self.max_severity).rank
            return frozenset(Severity(s) for s in _BANDS if Severity(s).rank > limit)
        return frozenset({Severity.CRITICAL})

    def blocks(self, finding: Finding) -> bool:
        if finding.severity is Severity.UNKNOWN:
            return self.unknown == "block"
        return finding.severity in self.blocking_severities

    def explain(self, finding: Finding) -> str:
        """Why ``finding`` blocks or not under this policy's thresholds (allow entries aside):
        what ``shipyard scan`` prints beside each finding and the gate records."""
        blocking = ", ".join(
            s.value for s in sorted(self.blocking_severities, key=lambda s: s.rank)
        )
        if finding.severity is Severity.UNKNOWN:
            if self.unknown == "block":
                return "no usable severity, and the policy blocks unknown severity"
            return (
                'no usable severity; the policy reports those without blocking (unknown = "allow")'
            )
        if self.blocks(finding):
            return f"{finding.severity.value} is a blocking severity (policy blocks {blocking})"
        return (
            f"{finding.severity.value} is below the blocking threshold "
            f"(policy blocks {blocking or 'nothing'})"
        )

    def describe(self) -> str:
        sev = ", ".join(s.value for s in sorted(self.blocking_severities, key=lambda s: s.rank))
        return (
            f"blocks {sev or 'nothing'}; unknown severity: {self.unknown}; "
            f"{len(self.allow)} allow entries"
        )


DEFAULT_POLICY = SecurityPolicy()


@dataclass(frozen=True)
class AllowedFinding:
    finding: Finding
    entry: AllowEntry

    @property
    def reason(self) -> str:
        return self.entry.reason


@dataclass(frozen=True)
class ExpiredAllow:
    entry: AllowEntry
    #: Findings the entry would have allowed; they are judged by severity again.
    matched: tuple[Finding, ...]


@dataclass(frozen=True)
class FindingVerdict:
    """One finding as judged: ``block``, ``allowed`` (by an active allow entry) or ``report``
    (below the threshold), and why in words."""

    finding: Finding
    status: Literal["block", "allowed", "report"]
    why: str

    @property
    def blocking(self) -> bool:
        return self.status == "block"

    def to_dict(self) -> dict[str, Any]:
        return {**self.finding.to_dict(), "status": self.status, "why": self.why}


@dataclass(frozen=True)
class PolicyEvaluation:
    blocking: tuple[Finding, ...]
    allowed: tuple[AllowedFinding, ...]
    passed: tuple[Finding, ...]  # below the threshold: reported, not blocking
    expired: tuple[ExpiredAllow, ...]
    policy: SecurityPolicy

    @property
    def blocked(self) -> bool:
        return bool(self.blocking)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for f in self.blocking:
            counts[f.severity.value] = counts.get(f.severity.value, 0) + 1
        parts = [
            f"{n} {sev}" for sev, n in sorted(counts.items(), key=lambda kv: -Severity(kv[0]).rank)
        ]
        text = (
            f"{len(self.blocking)} blocking finding(s)"
            + (f" ({', '.join(parts)})" if parts else "")
            + f", {len(self.allowed)} allowed, {len(self.passed)} reported without blocking"
        )
        if self.expired:
            text += "; expired allow entries: " + ", ".join(
                f"{e.entry.id} (expired {e.entry.expires.isoformat()})" for e in self.expired
            )
        return text

    def verdicts(self) -> list[FindingVerdict]:
        """Every finding with its status and reason, blocking first: the one list both the
        deploy gate's report and ``shipyard scan`` show."""
        out = [FindingVerdict(f, "block", self.policy.explain(f)) for f in self.blocking]
        out += [
            FindingVerdict(
                a.finding,
                "allowed",
                f"{a.reason} (allow entry {a.entry.id}, until {a.entry.expires.isoformat()})",
            )
            for a in self.allowed
        ]
        out += [FindingVerdict(f, "report", self.policy.explain(f)) for f in self.passed]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "blocked": self.blocked,
            "policy": self.policy.describe(),
            "blocking": [{**f.to_dict(), "why": self.policy.explain(f)} for f in self.blocking],
            "allowed": [
                {
                    **a.finding.to_dict(),
                    "allowed_by": a.entry.id,
                    "reason": a.reason,
                    "expires": a.entry.expires.isoformat(),
                }
                for a in self.allowed
            ],
            "passed": [{**f.to_dict(), "why": self.policy.explain(f)} for f in self.passed],
            "expired_allow_entries": [
                {
                    "id": e.entry.id,
                    "reason": e.entry.reason,
                    "expired": e.entry.expires.isoformat(),
                    "now_judged": [f.advisory_id for f in e.matched],
                }
                for e in self.expired
            ],
        }


def evaluate(
    policy: SecurityPolicy, findings: Iterable[Finding], *, today: dt.date
) -> PolicyEvaluation:
    """Judge findings: an active allow entry wins over severity; expired entries do nothing but
    are reported (with what they would have matched)."""
    findings = tuple(findings)
    active = [e for e in policy.allow if not e.expired(today)]
    expired = [e for e in policy.allow if e.expired(today)]
    blocking: list[Finding] = []
    allowed: list[AllowedFinding] = []
    passed: list[Finding] = []
    for f in findings:
        entry = next((e for e in active if e.matches(f)), None)
        if entry is not None:
            allowed.append(AllowedFinding(f, entry))
        elif policy.blocks(f):
            blocking.append(f)
        else:
            passed.append(f)
    return PolicyEvaluation(
        blocking=tuple(blocking),
        allowed=tuple(allowed),
        passed=tuple(passed),
        expired=tuple(ExpiredAllow(e, tuple(f for f in findings if e.matches(f))) for e in expired),
        policy=policy,
    )


# --- reading a policy -----------------------------------------------------------------------------


def parse_policy(data: Mapping[str, Any] | None, *, origin: str = "[security]") -> SecurityPolicy:
    """Validate a policy mapping; ``PolicyError`` names each bad field (``allow.0.reason``)."""
    if data is None:
        return DEFAULT_POLICY
    try:
        return SecurityPolicy.model_validate(dict(data))
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or '(policy)'}: "
            + str(err["msg"]).removeprefix("Value error, ")
            for err in exc.errors()
        ]
        raise PolicyError(f"{origin}: " + "; ".join(problems), problems=problems) from exc


def load_policy(path: Path) -> SecurityPolicy:
    """A policy file: TOML (a ``[security]`` table, e.g. shipyard.toml, or the fields at the top
    level), or JSON / YAML with the same shape."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc}") from exc
    try:
        if path.suffix == ".json":
            data: Any = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            data = tomllib.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"{path}: not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: a policy must be a table/object")
    if "security" in data:
        section = data["security"]
        if not isinstance(section, dict):
            raise PolicyError(f"{path}: [security] must be a table")
        return parse_policy(section, origin=f"{path} [security]")
    if data.keys() & _MANIFEST_TABLES:
        return DEFAULT_POLICY  # a shipyard.toml without a [security] table
    return parse_policy(data, origin=str(path))


_MANIFEST_TABLES = frozenset({"service", "build", "run", "health"})
