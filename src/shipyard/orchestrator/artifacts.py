"""Only the exact digest that was built, scanned and signed may start.

``verify`` checks a stored revision's signed provenance (the security gate's DSSE envelope names
the digest) and, for a directory artifact, that the files still hash to that digest. Called
before every start of a revision: a candidate (``steps/start.py``, ``steps/scale.py``), and the
serving revision the reconciler starts again.

``spec`` is what those callers hand the runtime: the revision's ``RevisionSpec`` carrying its
DSSE envelope (``provenance``), because the local agent checks signature and digest again itself
(``agent/verify.py``) and trusts nothing it cannot verify with the control plane's public key,
and the values of exactly the secret versions the revision recorded (``secret_env``,
``secret_files``), opened through ``Deps.secrets``: a rollback to an older revision gets its
older values. Every ``RevisionSpec`` made from a stored revision is made here (start, scale,
``shipyard scale``, the reconciler's restart, hooks), so no caller can forget the secrets.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from shipyard.build.digest import verify_artifact
from shipyard.domain.clock import to_thread
from shipyard.errors import ArtifactVerificationFailed, SecretMissing
from shipyard.orchestrator.record import RevisionRecord
from shipyard.runtime.base import RevisionSpec
from shipyard.security.app_secrets import SecretResolver
from shipyard.security.gate import SecurityGate
from shipyard.security.signing import read_envelope


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


async def spec(
    revision: RevisionRecord, secrets: SecretResolver | None, *, replicas: int | None = None
) -> RevisionSpec:
    """``revision.spec()`` with its signed provenance attached (None when it has none: a
    runtime that verifies refuses it), its recorded secret versions' values (``secrets``:
    ``Deps.secrets``; SecretMissing when the revision has secrets and there is none to open
    them with), and ``replicas`` if given."""
    out = revision.spec()
    if replicas is not None:
        out = dataclasses.replace(out, replicas=replicas)
    if revision.secrets:
        if secrets is None:
            raise SecretMissing(
                f"revision {revision.revision} runs with secrets "
                f"({', '.join(sorted(revision.secrets))}) and this control plane has no secret "
                "store configured",
                revision=revision.revision,
            )
        values = await secrets.values(revision.service, revision.secrets)
        files = revision.secret_files
        out = dataclasses.replace(
            out,
            secret_env={n: v for n, v in values.items() if n not in files},
            secret_files={files[n]: v for n, v in values.items() if n in files},
        )
    path = revision.attestation.envelope
    if not path:
        return out
    return dataclasses.replace(out, provenance=await to_thread(read_envelope, Path(path)))
