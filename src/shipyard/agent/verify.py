"""The agent's own check before it starts a revision: signed by the control plane, and the
artifact on disk is exactly the digest that was signed.

The control plane verifies every artifact before it asks for a start (``orchestrator/artifacts``),
but the agent does not take its word for it: whoever holds the agent's token (an app that read
it, say) could otherwise ask it to run any directory. So ``ArtifactVerifier.verify`` — called by
the agent server for every ``PUT .../revisions/{revision}`` and for every revision it restores
from ``state.json`` after a restart — checks, in this order:

1. the DSSE envelope the request carries (``RevisionSpec.provenance``, the one the security gate
   wrote) is signed by the control plane's key and its statement names ``artifact_digest``
   (``security.signing.verify``: unsigned, malformed, foreign key, bad signature, or a statement
   about another digest);
2. the artifact directory hashes to ``artifact_digest`` (``build.digest.verify_artifact``, the
   builder's own function); for an image revision instead, the Docker Engine holds the image
   whose ID is ``artifact_digest`` (pulled by its registry reference if need be) and
   ``artifact_location`` resolves to that same ID (``agent.images.ensure_image``: a retagged or
   replaced image is refused naming both digests).

The agent holds only the *public* key: ``<data_dir>/keys/signing.pub`` (which the control plane
derives from its private key) unless ``shipyard agent --trusted-key`` names another PEM file.
It is read when first needed and then kept for the agent's life, so replacing the file later
does not change whom a running agent trusts (a new key takes an agent restart).

No cache: the content digest is recomputed on every start (in a worker thread, so the router
keeps serving). Measured on the notes example built (480 files, 8.2 MB with its dependencies; 2
cores): 29 ms median with a warm page cache (max 47 ms over 30 runs), about 200 ms cold; the
signature check is 0.2 ms. That is small beside the app's own start, and a cache keyed by the
artifact root's mtime would be unsound (a file changed deeper in the tree does not touch it). A
replica the supervisor restarts after a crash does not come through here: same spec, verified
when its revision started.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import docker
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shipyard.agent.images import ensure_image
from shipyard.build.digest import verify_artifact
from shipyard.errors import ArtifactVerificationFailed, ShipyardError
from shipyard.runtime.base import RevisionSpec
from shipyard.security import signing


class ArtifactVerifier:
    """Verifies ``RevisionSpec`` s against the control plane's public key (see module docstring).

    ``trusted_key`` is a PEM file path, or the PEM itself (str/bytes) or a key object; a path
    that does not exist yet is read again at the next verification (the control plane creates
    its key on first use), and pinned once read. ``engine`` gives the Docker Engine client image
    revisions are checked against (None, or it returns None: this agent has no engine, and
    every image revision is refused)."""

    def __init__(
        self,
        trusted_key: Path | str | bytes | Ed25519PublicKey,
        engine: Callable[[], docker.DockerClient | None] | None = None,
    ) -> None:
        self._source = trusted_key
        self._engine = engine
        self._key: Ed25519PublicKey | None = None
        self._lock = threading.Lock()
        if not isinstance(trusted_key, Path) or trusted_key.exists():
            self._key = signing.load_public_key(trusted_key)

    def key(self) -> Ed25519PublicKey:
        """The pinned public key; ArtifactVerificationFailed when there is none to read."""
        with self._lock:
            if self._key is None:
                assert isinstance(self._source, Path)
                if not self._source.exists():
                    raise ArtifactVerificationFailed(
                        f"the agent has no trusted signing key: {self._source} does not exist. "
                        "It is the control plane's public key (`shipyard serve` writes it "
                        "when it first signs an artifact); or start the agent with "
                        "--trusted-key FILE",
                        reason="no_trusted_key",
                        check="signature",
                    )
                try:
                    self._key = signing.load_public_key(self._source)
                except ShipyardError as exc:
                    raise ArtifactVerificationFailed(
                        f"the agent's trusted key is unusable: {exc.message}",
                        reason="no_trusted_key",
                        check="signature",
                    ) from exc
            return self._key

    def verify(self, spec: RevisionSpec) -> None:
        """Raise ``ArtifactVerificationFailed`` unless ``spec`` may start (blocking: file reads
        and hashing; the server calls it in a worker thread). The error's ``check`` says which
        failed: ``signature`` (detail ``reason``: unsigned, malformed, foreign_key,
        bad_signature, digest_mismatch), ``digest`` (the files are not what was signed) or
        ``image`` (no engine, or it lacks the signed image, or the reference names another:
        ``agent.images``)."""
        self.verify_signature(spec)
        where = f"{spec.service}/{spec.revision}"
        if spec.artifact_kind == "oci-image":
            client = self._engine() if self._engine is not None else None
            if client is None:
                raise ArtifactVerificationFailed(
                    f"agent refused to start {where}: it is an image, and this agent has no "
                    "Docker Engine to check (or run) it on",
                    check="image",
                    reason="no_engine",
                    digest=spec.artifact_digest,
                )
            ensure_image(client, spec.artifact_location, spec.artifact_digest, where=where)
            return
        try:
            verify_artifact(Path(spec.artifact_location), spec.artifact_digest)
        except ArtifactVerificationFailed as exc:
            raise ArtifactVerificationFailed(
                f"agent refused to start {where}: digest check failed: {exc.message}",
                **{
                    **exc.detail,
                    "check": "digest",
                    # ``actual`` is there when the files hashed to something else; without it
                    # the directory is missing or unreadable.
                    "reason": "content_mismatch" if "actual" in exc.detail else "unreadable",
                },
            ) from exc

    def verify_signature(self, spec: RevisionSpec) -> None:
        """The first half of ``verify``: ``ArtifactVerificationFailed`` (``check``
        ``signature``) unless the spec's envelope is the control plane's signature over its
        digest. A joined agent checks it before it fetches anything (``Agent.localise``)."""
        where = f"{spec.service}/{spec.revision}"
        key = self.key()
        try:
            signing.verify(
                dict(spec.provenance) if spec.provenance is not None else None,
                spec.artifact_digest,
                key,
            )
        except ArtifactVerificationFailed as exc:
            raise ArtifactVerificationFailed(
                f"agent refused to start {where}: signature check failed: {exc.message}",
                **{**exc.detail, "check": "signature", "digest": spec.artifact_digest},
            ) from exc
        except ShipyardError as exc:  # a digest that is not sha256:<hex> (InvalidInput)
            raise ArtifactVerificationFailed(
                f"agent refused to start {where}: {exc.message}",
                check="signature",
                reason="malformed",
                digest=spec.artifact_digest,
            ) from exc
