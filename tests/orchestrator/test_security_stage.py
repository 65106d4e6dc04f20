"""The security gate inside the pipeline: scan + sign after the build, signature and digest
verified before every start (including a rollback's restart of an old revision)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.build.fake import DEFAULT_MANIFEST, FakeBuilder
from shipyard.domain.manifest import parse_manifest
from shipyard.security.gate import SecurityGate
from shipyard.security.signing import Ed25519Signer, read_envelope, sign_statement, write_envelope
from tests.orchestrator.world import PipelineWorld
from tests.shared_data import find_pypa_db

OSV_DB = find_pypa_db()
VULNERABLE_PYYAML = {
    "deps/PyYAML-5.3.dist-info/METADATA": "Metadata-Version: 2.1\nName: PyYAML\nVersion: 5.3\n",
    "app.py": "print('hi')\n",
}


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[PipelineWorld]:
    w = PipelineWorld(tmp_path, builder=FakeBuilder(root=tmp_path / "artifacts"))
    w.gate = SecurityGate(data_dir=tmp_path, db_path=None)
    w.attestations_dir = tmp_path / "attestations"
    w.pipeline = w.new_pipeline()
    await w.pipeline.start()
    yield w
    await w.pipeline.stop()


async def test_every_artifact_gets_an_sbom_and_signed_provenance(world: PipelineWorld) -> None:
    doc = await world.deploy("aaaa1111")
    assert doc["status"] == "Success", doc.get("error")
    scan = next(s for s in doc["stages"] if s["name"] == "scan")
    assert scan["detail"]["scan_skipped"].startswith("no vulnerability database")
    envelope = read_envelope(Path(scan["detail"]["provenance"]))
    assert envelope is not None
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["subject"][0]["digest"]["sha256"] == doc["artifact_digest"].removeprefix(
        "sha256:"
    )
    assert json.loads(Path(scan["detail"]["sbom"]).read_text())["bomFormat"] == "CycloneDX"
    events = [r.event_type for r in await world.audit.records(deployment_id=doc["id"])]
    assert (
        events.index("security_scan.passed")
        < events.index("artifact.verified")
        < events.index("revision.started")
    )


async def _cold_previous_revision(world: PipelineWorld) -> tuple[dict[str, Any], dict[str, Any]]:
    first = await world.deploy("aaaa1111")
    second = await world.deploy("bbbb2222", bake_seconds=0, scale_down_delay_seconds=1)
    await world.clock.sleep(2)
    await world.pipeline.retire_expired()
    return first, second


async def test_a_tampered_artifact_is_refused_before_it_starts(world: PipelineWorld) -> None:
    first, second = await _cold_previous_revision(world)
    spec = world.store.get_revision_spec(first["green_revision"])
    (Path(spec["artifact_location"]) / "app.py").write_text("print('backdoor')\n")
    started_before = list(world.runtime.started)
    rb = await world.rollback(second["id"], "bob")
    final = await world.wait(rb["id"])
    assert final["status"] == "RolledBack"  # back on the revision that was serving: v2
    assert final["error"]["type"] == "ArtifactVerificationFailed"
    assert "was modified after the build" in final["error"]["message"]
    assert world.runtime.started == started_before  # nothing was started
    assert world.weights() == {second["green_revision"]: 100}


async def test_a_foreign_signature_is_refused(world: PipelineWorld, tmp_path: Path) -> None:
    first, second = await _cold_previous_revision(world)
    spec = world.store.get_revision_spec(first["green_revision"])
    path = Path(spec["attestation"]["envelope"])
    envelope = read_envelope(path)
    assert envelope is not None
    statement = json.loads(base64.b64decode(envelope["payload"]))
    write_envelope(sign_statement(Ed25519Signer.generate(), statement), path)
    rb = await world.rollback(second["id"], "bob")
    final = await world.wait(rb["id"])
    assert final["error"]["type"] == "ArtifactVerificationFailed"
    assert final["error"]["reason"] == "foreign_key"
    assert world.weights() == {second["green_revision"]: 100}


async def test_policy_blocks_a_vulnerable_artifact_and_nothing_is_deployed(tmp_path: Path) -> None:
    assert OSV_DB is not None, "shared/data/pypa-advisory-db not found; set SHIPYARD_TEST_OSV_DB"
    manifest = parse_manifest(DEFAULT_MANIFEST + '\n[security]\nunknown = "block"\n')
    builder = FakeBuilder(manifest=manifest, root=tmp_path / "artifacts", files=VULNERABLE_PYYAML)
    w = PipelineWorld(tmp_path, builder=builder)
    w.gate = SecurityGate(data_dir=tmp_path, db_path=OSV_DB)
    w.attestations_dir = tmp_path / "attestations"
    w.pipeline = w.new_pipeline()
    await w.pipeline.start()
    try:
        doc = await w.deploy("aaaa1111")
    finally:
        await w.pipeline.stop()
    assert doc["status"] == "Failed"
    assert doc["error"]["type"] == "SecurityScanFailed"
    assert doc["error"]["vulnerabilities"] >= 1
    assert any(f["package"] == "pyyaml" for f in doc["error"]["findings"])
    assert w.runtime.started == []
    records = await w.audit.records(deployment_id=doc["id"])
    blocked = next(r for r in records if r.event_type == "security_scan.failed")
    assert any(a.startswith(("PYSEC", "GHSA", "CVE")) for a in blocked.detail["advisories"])


async def test_an_unsigned_artifact_is_refused(world: PipelineWorld) -> None:
    first, second = await _cold_previous_revision(world)
    spec = world.store.get_revision_spec(first["green_revision"])
    Path(spec["attestation"]["envelope"]).unlink()
    started_before = list(world.runtime.started)
    rb = await world.rollback(second["id"], "bob")
    final = await world.wait(rb["id"])
    assert final["error"]["type"] == "ArtifactVerificationFailed"
    assert final["error"]["reason"] == "unsigned"
    assert world.runtime.started == started_before
    assert world.weights() == {second["green_revision"]: 100}
