"""Only the exact digest that was built, scanned and signed may start.

``verify`` checks a stored revision's signed provenance (the security gate's DSSE envelope names
the digest) and, for a directory artifact, that the files still hash to that digest. Called
before every start of a revision: a candidate (``steps/start.py``, ``steps/scale.py``), and the
serving revision the reconciler starts again.
"""

from __future__ import annotations

from pathlib import Path

from shipyard.build.digest import verify_artifact
from shipyard.domain.clock import to_thread
from shipyard.errors import ArtifactVerificationFailed
from shipyard.orchestrator.record import RevisionRecord
from shipyard.security.gate import SecurityGate


async def verify(gate: SecurityGate | None, revision: RevisionRecord) -> bool:
    """Raise ``ArtifactVerificationFailed`` unless ``revision`` may start; False when there is
    no gate to verify with (unit tests of other stages), True when it was verified."""
    if gate is None:
        return False
    envelope = revision.attestation.envelope
    if not envelope:
        raise ArtifactVerificationFailed(
            f"revision {revision.revision} has no signed provenance; rebuild it",
            reason="unsigned",
        )
    await gate.verify_digest(revision.artifact_digest, Path(envelope))
    location = Path(revision.artifact_location)
    if await to_thread(location.is_dir):
        await to_thread(verify_artifact, location, revision.artifact_digest)
    return True
