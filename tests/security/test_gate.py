"""The security gate end to end on the real PyPA database: clean artifacts are signed and pass
verification; vulnerable ones are blocked with their findings; allow entries and their expiry;
verification before deploy refuses anything but the exact signed digest."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shipyard.build.base import Artifact
from shipyard.domain.clock import FakeClock
from shipyard.domain.manifest import Manifest, parse_manifest
from shipyard.errors import ArtifactVerificationFailed, SecurityScanFailed
from shipyard.security import osv, signing
from shipyard.security.cvss import Severity
from shipyard.security.fake import FakeScanner
from shipyard.security.gate import SecurityGate, manifest_policy
from shipyard.security.policy import PolicyError, SecurityPolicy, parse_policy
from shipyard.security.scanning import Finding, OsvScanner, Rating

from .conftest import WriteDb, advisory, artifact_tree

MANIFEST = parse_manifest(
    '[service]\nname = "hello"\n[build]\ncommand = "pip install -r requirements.txt -t deps"\n'
    '[run]\ncommand = "python app.py"\n'
)
JUNE_2025 = dt.datetime(2025, 6, 1, tzinfo=dt.UTC).timestamp()


def make_artifact(root: Path, packages: dict[str, str], *, kind: str = "directory") -> Artifact:
    artifact_tree(root, packages)
    digest = "sha256:" + hashlib.sha256(json.dumps(sorted(packages.items())).encode()).hexdigest()
    return Artifact(
        digest=digest,
        kind="oci-image" if kind == "oci-image" else "directory",
        location="registry.invalid/hello:1" if kind == "oci-image" else str(root),
        commit="c0ffee" * 6 + "c0ff",
        manifest=MANIFEST,
        builder="local",
        duration_ms=1,
    )


GateFactory = Callable[..., SecurityGate]


@pytest.fixture
def gate_for(tmp_path: Path, pypa_db_path: Path, osv_cache_dir: Path) -> GateFactory:
    """Gates sharing one data dir (one signing key) on the real database, clock in June 2025."""

    def make(policy: SecurityPolicy | None = None) -> SecurityGate:
        return SecurityGate(
            data_dir=tmp_path / "data",
            db_path=pypa_db_path,
            policy=policy,
            clock=FakeClock(JUNE_2025),
            cache_dir=osv_cache_dir,
        )

    return make


SAFE = {"requests": "2.32.3", "flask": "3.0.3", "urllib3": "2.2.3"}
CRITICAL = {**SAFE, "langchain": "0.0.170"}  # PYSEC-2023-151 & co: CVSS 9.8
HIGH = {**SAFE, "urllib3": "2.0.5"}  # PYSEC-2023-192: CVSS 8.1


async def test_clean_artifact_is_signed_and_verifies(gate_for: GateFactory, tmp_path: Path) -> None:
    gate = gate_for()
    artifact = make_artifact(tmp_path / "app", SAFE)
    report = await gate.check(
        artifact, tmp_path / "sboms", source_repository="https://git.example.invalid/hello.git"
    )
    assert report.findings == ()
    assert report.packages == 3
    assert report.sbom_path.is_file()
    assert report.envelope_path.is_file()
    assert set(report.durations_ms) == {"inventory", "sbom", "scan", "policy", "sign", "total"}
    statement = await gate.verify_before_deploy(artifact, report.envelope_path)
    assert statement["subject"] == [
        {"name": "hello", "digest": {"sha256": artifact.digest.removeprefix("sha256:")}}
    ]
    predicate = statement["predicate"]
    assert (
        predicate["buildDefinition"]["externalParameters"]["buildCommand"] == MANIFEST.build.command
    )
    assert predicate["buildDefinition"]["resolvedDependencies"][0]["digest"] == {
        "gitCommit": artifact.commit
    }
    assert predicate["runDetails"]["builder"]["id"] == "urn:shipyard:builder:local"
    sbom_sha = hashlib.sha256(report.sbom_path.read_bytes()).hexdigest()
    assert predicate["runDetails"]["byproducts"][0]["digest"] == {"sha256": sbom_sha}
    assert predicate["runDetails"]["metadata"]["finishedOn"] == "2025-06-01T00:00:00Z"
    assert report.keyid == signing.Ed25519Signer.load_or_create(tmp_path / "data").keyid


async def test_critical_vulnerability_blocks(gate_for: GateFactory, tmp_path: Path) -> None:
    artifact = make_artifact(tmp_path / "app", CRITICAL)
    with pytest.raises(SecurityScanFailed) as info:
        await gate_for().check(artifact, tmp_path / "sboms")
    err = info.value
    blocking = err.detail["findings"]
    assert err.vulnerabilities == len(blocking) >= 1
    assert {f["package"] for f in blocking} == {"langchain"}
    assert all(f["severity"] == "critical" for f in blocking)
    assert "PYSEC-2023-151" in {f["advisory_id"] for f in blocking}
    assert "critical" in err.message
    assert not any((tmp_path / "sboms").glob("*.dsse.json"))  # nothing signed
    assert Path(err.detail["sbom"]).is_file()  # the evidence is kept


async def test_high_passes_by_default_and_blocks_when_policy_says(
    gate_for: GateFactory, tmp_path: Path
) -> None:
    artifact = make_artifact(tmp_path / "app", HIGH)
    report = await gate_for().check(artifact, tmp_path / "sboms")
    assert [
        (f.advisory_id, f.severity) for f in report.evaluation.passed if f.package == "urllib3"
    ][:1] == [("PYSEC-2023-192", Severity.HIGH)]
    strict = parse_policy({"block": ["critical", "high"]})
    with pytest.raises(SecurityScanFailed, match=r"blocking finding\(s\) \(\d+ high\)") as info:
        await gate_for().check(artifact, tmp_path / "sboms2", policy=strict)
    blocking = info.value.detail["findings"]
    assert "PYSEC-2023-192" in {f["advisory_id"] for f in blocking}
    assert {f["severity"] for f in blocking} == {"high"}


@pytest.mark.parametrize(
    ("expires", "blocked"),
    [
        pytest.param("2025-12-31", False, id="active-entry"),
        pytest.param("2025-05-31", True, id="expired-entry"),
    ],
)
async def test_allow_entry_lets_a_reviewed_finding_through_until_it_expires(
    gate_for: GateFactory, tmp_path: Path, expires: str, blocked: bool
) -> None:
    artifact = make_artifact(
        tmp_path / "app", {"gdal": "3.0.1"}
    )  # PYSEC-2019-241, CVE-2019-17545, 9.8
    policy = parse_policy(
        {"allow": [{"id": "CVE-2019-17545", "reason": "no untrusted rasters", "expires": expires}]}
    )
    gate = gate_for(policy)
    if blocked:
        with pytest.raises(SecurityScanFailed) as info:
            await gate.check(artifact, tmp_path / "sboms")
        assert info.value.detail["expired_allow"] == ["CVE-2019-17545"]
        assert "expired allow entries: CVE-2019-17545" in info.value.message
    else:
        report = await gate.check(artifact, tmp_path / "sboms")
        assert [(a.finding.advisory_id, a.reason) for a in report.evaluation.allowed] == [
            ("PYSEC-2019-241", "no untrusted rasters")
        ]


async def test_manifest_security_table_is_used(gate_for: GateFactory, tmp_path: Path) -> None:
    # How the manifest will carry it: a `security` table, validated by the gate.
    class ManifestWithSecurity(Manifest):
        security: dict[str, Any] | None = None

    strict = ManifestWithSecurity.model_validate(
        {**MANIFEST.model_dump(), "security": {"block": ["high", "critical"]}}
    )
    artifact = dataclasses.replace(make_artifact(tmp_path / "app", HIGH), manifest=strict)
    with pytest.raises(SecurityScanFailed, match="high"):
        await gate_for().check(artifact, tmp_path / "sboms")


@pytest.mark.parametrize(
    ("section", "result"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param({"unknown": "block"}, "block", id="mapping"),
        pytest.param(SecurityPolicy(unknown="block"), "block", id="model"),
    ],
)
def test_manifest_policy(section: object, result: str | None) -> None:
    policy = manifest_policy(SimpleNamespace(security=section))
    assert (policy.unknown if policy else None) == result


def test_manifest_policy_malformed_names_the_field() -> None:
    with pytest.raises(PolicyError, match=r"shipyard.toml \[security\]: block.0"):
        manifest_policy(SimpleNamespace(security={"block": ["nope"]}))


async def test_verify_before_deploy_refuses_other_digests_and_missing_envelopes(
    gate_for: GateFactory, tmp_path: Path
) -> None:
    gate = gate_for()
    artifact = make_artifact(tmp_path / "app", SAFE)
    report = await gate.check(artifact, tmp_path / "sboms")
    other = make_artifact(tmp_path / "other", {"flask": "3.0.3"})
    with pytest.raises(ArtifactVerificationFailed, match="digest mismatch"):
        await gate.verify_before_deploy(other, report.envelope_path)
    with pytest.raises(ArtifactVerificationFailed, match="unsigned"):
        await gate.verify_before_deploy(other, tmp_path / "sboms" / "missing.dsse.json")
    # Another server (another data dir, another key) does not accept this server's signature.
    stranger = SecurityGate(
        data_dir=tmp_path / "elsewhere", db_path=gate.db_path, cache_dir=gate.cache_dir
    )
    with pytest.raises(ArtifactVerificationFailed, match="foreign key"):
        await stranger.verify_before_deploy(artifact, report.envelope_path)


async def test_missing_artifact_directory_fails_the_scan(
    gate_for: GateFactory, tmp_path: Path
) -> None:
    artifact = dataclasses.replace(
        make_artifact(tmp_path / "app", SAFE), location=str(tmp_path / "gone")
    )
    with pytest.raises(SecurityScanFailed, match="not a directory") as info:
        await gate_for().check(artifact, tmp_path / "sboms")
    assert info.value.detail["reason"] == "not_scannable"


async def test_missing_database_fails_closed(tmp_path: Path) -> None:
    gate = SecurityGate(data_dir=tmp_path / "data", db_path=tmp_path / "no-osv")
    with pytest.raises(SecurityScanFailed, match="no-osv does not exist") as info:
        await gate.check(make_artifact(tmp_path / "app", SAFE), tmp_path / "sboms")
    assert info.value.detail["reason"] == "no_database"


async def test_oci_image_needs_its_root_filesystem(gate_for: GateFactory, tmp_path: Path) -> None:
    artifact = make_artifact(tmp_path / "rootfs", SAFE, kind="oci-image")
    with pytest.raises(SecurityScanFailed, match="rootfs"):
        await gate_for().check(artifact, tmp_path / "sboms")
    report = await gate_for().check(artifact, tmp_path / "sboms", rootfs=tmp_path / "rootfs")
    statement = await gate_for().verify_before_deploy(artifact, report.envelope_path)
    assert statement["subject"][0]["name"] == "registry.invalid/hello:1"


async def test_gate_with_fake_scanner(tmp_path: Path) -> None:
    bad = Finding(
        "PyPI", "requests", "2.32.3", "FAKE-1", ("FAKE-1",), (), Rating(Severity.CRITICAL)
    )
    scanner = FakeScanner([bad])
    gate = SecurityGate(data_dir=tmp_path / "data", db_path=tmp_path / "no-db", scanner=scanner)
    with pytest.raises(SecurityScanFailed) as info:
        await gate.check(make_artifact(tmp_path / "app", SAFE), tmp_path / "sboms")
    assert info.value.vulnerabilities == 1
    assert [p.name for p in scanner.scanned[0].packages] == ["flask", "requests", "urllib3"]


def test_database_is_loaded_once_per_process(gate_for: GateFactory, pypa_db_path: Path) -> None:
    try:
        a, b = gate_for(), gate_for()
        scanner_a, scanner_b = a.scanner(), b.scanner()
        assert scanner_a is a.scanner()
        assert isinstance(scanner_a, OsvScanner)
        assert isinstance(scanner_b, OsvScanner)
        assert scanner_a.database is scanner_b.database
        assert osv.load_shared(pypa_db_path) is scanner_a.database
    finally:
        osv.clear_shared()


async def test_database_changes_are_picked_up(tmp_path: Path, write_db: WriteDb) -> None:
    db = write_db(advisory("OLD-1", "unrelated", events=[{"introduced": "0"}]))
    gate = SecurityGate(data_dir=tmp_path / "data", db_path=db, clock=FakeClock(JUNE_2025))
    artifact = make_artifact(tmp_path / "app", SAFE)
    try:
        assert (await gate.check(artifact, tmp_path / "sboms")).findings == ()
        critical = [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}]
        write_db(advisory("NEW-1", "flask", versions=["3.0.3"], severity=critical))
        with pytest.raises(SecurityScanFailed, match="1 critical"):
            await gate.check(artifact, tmp_path / "sboms")
    finally:
        osv.clear_shared()
