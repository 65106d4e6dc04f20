"""The security gate (ADR-014 section 9): between build and deploy, every artifact is inventoried,
described in an SBOM, scanned against the offline OSV database, judged by the security policy
and, only if nothing blocks, signed (in-toto/SLSA provenance in a DSSE envelope). Before a deploy,
``verify_before_deploy`` checks that exact digest's signature.

The orchestrator's scan stage calls ``SecurityGate.check``; a blocked artifact raises
``SecurityScanFailed`` (``vulnerabilities`` = blocking findings, ``findings`` = their details), so
the deployment ends Failed with the reason on record. Blocking work (file walks, YAML, crypto)
runs in worker threads (``domain.clock.to_thread``, which a FakeClock waits for); the database
is loaded once per process (``osv.load_shared``) and its parsed form cached under
``<data_dir>/cache/osv``.

An ``oci-image`` artifact is scanned through its files: the caller (the orchestrator's scan
stage) exports them from the engine (``build/image_export.py`` + ``rootfs.extract_scan_files``)
and passes the directory as ``rootfs``; package locations are then reported as the image names
them (``/usr/lib/python3/...``).

The gate takes any object shaped like ``shipyard.build.base.Artifact`` (``ArtifactLike``): build
and security are sibling layers and do not import each other.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from shipyard.domain.clock import Clock, SystemClock, to_thread
from shipyard.domain.manifest import Manifest
from shipyard.errors import InvalidInput, SecurityScanFailed
from shipyard.security import inventory as inv
from shipyard.security import osv, sbom, signing
from shipyard.security import policy as policies
from shipyard.security import rootfs as rootfs_files
from shipyard.security.scanning import Finding, OsvScanner, Scanner


class ArtifactLike(Protocol):
    """What the gate reads of ``shipyard.build.base.Artifact``."""

    @property
    def digest(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def location(self) -> str: ...
    @property
    def commit(self) -> str: ...
    @property
    def builder(self) -> str: ...
    @property
    def manifest(self) -> Manifest: ...


@dataclass(frozen=True)
class GateReport:
    digest: str
    packages: int
    findings: tuple[Finding, ...]
    evaluation: policies.PolicyEvaluation
    sbom_path: Path
    envelope_path: Path
    keyid: str
    #: Milliseconds per step: inventory, sbom, scan, policy, sign, total.
    durations_ms: Mapping[str, int]
    skipped: tuple[inv.Skipped, ...] = ()
    database: osv.DatabaseStats | None = field(default=None, compare=False)
    #: Why no vulnerability scan ran (no database configured), else None.
    scan_skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """For the deployment's scan StageRecord.detail and the API."""
        return {
            "digest": self.digest,
            "packages": self.packages,
            "findings": len(self.findings),
            "evaluation": self.evaluation.to_dict(),
            "sbom": str(self.sbom_path),
            "provenance": str(self.envelope_path),
            "keyid": self.keyid,
            "durations_ms": dict(self.durations_ms),
            "skipped": [{"source": s.source, "reason": s.reason} for s in self.skipped],
            "scan_skipped": self.scan_skipped,
            "database": None
            if self.database is None
            else {
                "path": self.database.path,
                "advisories": self.database.advisories,
                "problems": len(self.database.problems),
            },
        }


def manifest_policy(manifest: Any) -> policies.SecurityPolicy | None:
    """The manifest's ``[security]`` table, if the manifest model carries one."""
    section = getattr(manifest, "security", None)
    if section is None or isinstance(section, policies.SecurityPolicy):
        return section
    if isinstance(section, BaseModel):
        section = section.model_dump(exclude_unset=True)
    if not isinstance(section, Mapping):
        raise policies.PolicyError("shipyard.toml [security]: must be a table")
    return policies.parse_policy(section, origin="shipyard.toml [security]")


def effective_policy(
    explicit: policies.SecurityPolicy | None,
    manifest: Any,
    fallback: policies.SecurityPolicy | None = None,
) -> policies.SecurityPolicy:
    """Which policy judges: ``explicit`` (a caller's, ``scan --policy``), else the manifest's
    ``[security]`` table, else ``fallback`` (the server's), else the built-in default. The gate
    and ``shipyard scan`` both choose with this, so they block the same things."""
    return explicit or manifest_policy(manifest) or fallback or policies.DEFAULT_POLICY


@dataclass(frozen=True)
class Assessment:
    """What scanning an inventory and judging its findings gave."""

    findings: tuple[Finding, ...]
    evaluation: policies.PolicyEvaluation
    database: osv.DatabaseStats | None = None
    #: Milliseconds: scan, policy.
    durations_ms: Mapping[str, int] = field(default_factory=dict)


def assess(
    scanner: Scanner,
    inventory: inv.Inventory,
    policy: policies.SecurityPolicy,
    *,
    today: dt.date,
) -> Assessment:
    """Scan ``inventory`` and judge the findings under ``policy``: the one code path that decides
    what blocks, for the deploy gate (``SecurityGate.check``) and ``shipyard scan`` alike."""
    started = time.perf_counter()
    result = scanner.scan(inventory)
    scanned = time.perf_counter()
    evaluation = policies.evaluate(policy, result.findings, today=today)
    durations = {
        "scan": round((scanned - started) * 1000),
        "policy": round((time.perf_counter() - scanned) * 1000),
    }
    return Assessment(result.findings, evaluation, result.database, durations)


def subject_name(artifact: ArtifactLike) -> str:
    # An image is known by its reference; a directory artifact by the service it runs.
    if artifact.kind == "oci-image":
        return artifact.location
    return artifact.manifest.service.name


def envelope_path_for(directory: Path, digest: str) -> Path:
    return directory / f"{digest.partition(':')[2]}.provenance.dsse.json"


class SecurityGate:
    def __init__(
        self,
        *,
        data_dir: Path,
        db_path: Path | None,
        policy: policies.SecurityPolicy | None = None,
        clock: Clock | None = None,
        scanner: Scanner | None = None,
        signer: signing.Signer | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.db_path = db_path
        self.policy = policy if policy is not None else policies.DEFAULT_POLICY
        self.clock = clock or SystemClock()
        self.cache_dir = cache_dir if cache_dir is not None else data_dir / "cache" / "osv"
        self._injected_scanner = scanner
        self._osv_scanner: OsvScanner | None = None
        self._signer = signer
        self._lock = threading.Lock()

    # -- lazily built collaborators (first use happens in a worker thread) --

    def scanner(self) -> Scanner:
        """The injected scanner, else the OSV scanner over the process-wide database; a
        database whose files changed on disk is reloaded (the check costs one stat per file)."""
        if self._injected_scanner is not None:
            return self._injected_scanner
        if self.db_path is None:
            raise osv.DatabaseError("no vulnerability database configured")
        with self._lock:
            db = osv.load_shared(self.db_path, cache_dir=self.cache_dir)
            if self._osv_scanner is None or self._osv_scanner.database is not db:
                self._osv_scanner = OsvScanner(db)
            return self._osv_scanner

    def signer(self) -> signing.Signer:
        with self._lock:
            if self._signer is None:
                self._signer = signing.Ed25519Signer.load_or_create(self.data_dir)
            return self._signer

    async def public_key_pem(self) -> str:
        return (await to_thread(self.signer)).public_key_pem()

    # -- the gate --

    def inventory_of(self, artifact: ArtifactLike, rootfs: Path | None = None) -> inv.Inventory:
        if rootfs is not None or artifact.kind == "directory":
            try:
                if rootfs is not None:
                    return rootfs_files.image_inventory(rootfs, artifact.location)
                return inv.from_tree(Path(artifact.location))
            except InvalidInput as exc:
                raise SecurityScanFailed(
                    f"cannot scan artifact {artifact.digest}: {exc.message}",
                    vulnerabilities=0,
                    reason="not_scannable",
                ) from exc
        raise SecurityScanFailed(
            f"cannot scan {artifact.kind} artifact {artifact.location} ({artifact.digest}): "
            "the gate reads files, so pass the image's exported root filesystem as `rootfs`",
            vulnerabilities=0,
            reason="not_scannable",
        )

    async def check(
        self,
        artifact: ArtifactLike,
        sbom_dir: Path,
        *,
        source_repository: str | None = None,
        policy: policies.SecurityPolicy | None = None,
        rootfs: Path | None = None,
    ) -> GateReport:
        """SBOM, scan, policy, then sign. Raises SecurityScanFailed when the policy blocks.

        The policy is ``policy`` if given, else the manifest's ``[security]`` table, else the
        gate's (server) policy."""
        started = time.perf_counter()
        durations: dict[str, int] = {}

        def lap(name: str, since: float) -> float:
            now = time.perf_counter()
            durations[name] = round((now - since) * 1000)
            return now

        effective = effective_policy(policy, artifact.manifest, self.policy)
        t = started
        inventory = await to_thread(self.inventory_of, artifact, rootfs)
        t = lap("inventory", t)
        subject = sbom.SbomSubject(
            digest=artifact.digest,
            name=subject_name(artifact),
            kind=artifact.kind,
            commit=artifact.commit,
            builder=artifact.builder,
        )
        sbom_path = await to_thread(sbom.write_sbom, inventory, subject, sbom_dir)
        t = lap("sbom", t)
        if self.db_path is None and self._injected_scanner is None:
            return await self._signed_without_scan(
                artifact, inventory, sbom_path, sbom_dir, source_repository, durations, started, t
            )
        try:
            scanner = await to_thread(self.scanner)
        except osv.DatabaseError as exc:
            # Without its database the gate cannot vouch for anything: fail closed.
            raise SecurityScanFailed(
                f"cannot scan {artifact.digest}: {exc.message}",
                vulnerabilities=0,
                reason="no_database",
            ) from exc
        today = dt.datetime.fromtimestamp(self.clock.now(), dt.UTC).date()
        result = await to_thread(assess, scanner, inventory, effective, today=today)
        evaluation = result.evaluation
        durations.update(result.durations_ms)
        t = time.perf_counter()
        if evaluation.blocked:
            raise SecurityScanFailed(
                f"security gate blocked {artifact.digest}: {evaluation.summary()}. Upgrade the "
                "packages listed (fixed versions given) or add a reviewed, expiring allow entry.",
                vulnerabilities=len(evaluation.blocking),
                findings=[
                    {**f.to_dict(), "why": effective.explain(f)} for f in evaluation.blocking
                ],
                allowed=[a.finding.advisory_id for a in evaluation.allowed],
                reported=[f.advisory_id for f in evaluation.passed],
                expired_allow=[e.entry.id for e in evaluation.expired],
                sbom=str(sbom_path),
            )
        envelope_path = envelope_path_for(sbom_dir, artifact.digest)
        keyid = await to_thread(
            self._sign, artifact, sbom_path, envelope_path, source_repository, today
        )
        lap("sign", t)
        durations["total"] = round((time.perf_counter() - started) * 1000)
        return GateReport(
            digest=artifact.digest,
            packages=len(inventory.packages),
            findings=result.findings,
            evaluation=evaluation,
            sbom_path=sbom_path,
            envelope_path=envelope_path,
            keyid=keyid,
            durations_ms=durations,
            skipped=inventory.skipped,
            database=result.database,
        )

    async def _signed_without_scan(
        self,
        artifact: ArtifactLike,
        inventory: inv.Inventory,
        sbom_path: Path,
        sbom_dir: Path,
        source_repository: str | None,
        durations: dict[str, int],
        started: float,
        t: float,
    ) -> GateReport:
        """No vulnerability database is configured: the SBOM and the signature still happen (so
        the deploy stage can verify the digest), and the report says the scan was skipped."""
        today = dt.datetime.fromtimestamp(self.clock.now(), dt.UTC).date()
        envelope_path = envelope_path_for(sbom_dir, artifact.digest)
        keyid = await to_thread(
            self._sign, artifact, sbom_path, envelope_path, source_repository, today
        )
        durations["sign"] = round((time.perf_counter() - t) * 1000)
        durations["total"] = round((time.perf_counter() - started) * 1000)
        return GateReport(
            digest=artifact.digest,
            packages=len(inventory.packages),
            findings=(),
            evaluation=policies.evaluate(self.policy, (), today=today),
            sbom_path=sbom_path,
            envelope_path=envelope_path,
            keyid=keyid,
            durations_ms=durations,
            skipped=inventory.skipped,
            scan_skipped="no vulnerability database configured (shipyard serve --osv-db DIR)",
        )

    def _sign(
        self,
        artifact: ArtifactLike,
        sbom_path: Path,
        envelope_path: Path,
        source_repository: str | None,
        today: dt.date,
    ) -> str:
        signer = self.signer()
        source_uri = (
            signing.source_uri(source_repository, artifact.commit) if source_repository else None
        )
        statement = signing.provenance_statement(
            subject_name=subject_name(artifact),
            subject_digest=artifact.digest,
            builder_id=f"urn:shipyard:builder:{artifact.builder}",
            source_repository=source_repository,
            commit=artifact.commit,
            build_command=artifact.manifest.build.command_text,
            materials=[
                signing.Material(
                    uri=source_uri, digest={"gitCommit": artifact.commit}, name="source"
                )
            ],
            byproducts=[
                signing.Material(
                    name=sbom_path.name,
                    digest={"sha256": sbom.file_digest(sbom_path).partition(":")[2]},
                )
            ],
            metadata={
                "finishedOn": dt.datetime.fromtimestamp(self.clock.now(), dt.UTC)
                .isoformat()
                .replace("+00:00", "Z")
            },
        )
        signing.write_envelope(signing.sign_statement(signer, statement), envelope_path)
        return signer.keyid

    async def verify_before_deploy(
        self, artifact: ArtifactLike, envelope_path: Path
    ) -> dict[str, Any]:
        """The signed statement for exactly ``artifact.digest``; ArtifactVerificationFailed when
        the envelope is missing, malformed, tampered, foreign, or about another digest."""
        return await self.verify_digest(artifact.digest, envelope_path)

    async def verify_digest(self, digest: str, envelope_path: Path) -> dict[str, Any]:
        """``verify_before_deploy`` for callers that hold only the digest (the orchestrator's
        start step reads it from the stored revision)."""
        pem = await self.public_key_pem()
        return await to_thread(signing.verify_file, envelope_path, digest, pem)
