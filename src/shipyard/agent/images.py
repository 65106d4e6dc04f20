"""Makes sure the Docker Engine holds exactly the image that was signed, before the agent starts a
container from it; called by ``agent.verify.ArtifactVerifier`` (in a worker thread: the docker
SDK blocks) for every start and restore of an image revision.

An image revision names its image twice: ``artifact_digest``, the image ID (``sha256:...``, the
digest of its config) that the builder produced and the security gate scanned and signed, and
``artifact_location``, the reference it was built or pushed as (a local tag such as
``shipyard/svc:abc123def456``, or ``registry:5000/svc@sha256:<manifest digest>``). Containers
are created from the ID, never the reference, so a tag moved afterwards cannot change what runs;
but a reference that resolves to another image means someone retagged or replaced it, and that
is refused too, naming both digests, instead of quietly running something nobody reviewed.
"""

from __future__ import annotations

import docker
import docker.errors

from shipyard.errors import ArtifactVerificationFailed

#: Foreign error text is cut to this before it goes into an error (``docker.errors`` bodies can
#: be whole HTML pages from a proxy in front of a registry).
MAX_ERROR = 300


def is_registry_reference(location: str) -> bool:
    """Whether ``location`` names an image in a registry by digest: a registry host first (it has
    a ``.`` or a ``:`` port, or is ``localhost``) and ``@sha256:`` after the repository."""
    name, at, digest = location.partition("@")
    return bool(at) and digest.startswith("sha256:") and names_registry(name)


def names_registry(location: str) -> bool:
    """Whether ``location`` starts with a registry host (one with a ``.`` or a ``:`` port, or
    ``localhost``), by digest or by tag: an engine that lacks the image may pull it from there."""
    if "/" not in location:
        return False
    host = location.split("/", 1)[0]
    return "." in host or ":" in host or host == "localhost"


def ensure_image(client: docker.DockerClient, location: str, digest: str, *, where: str) -> str:
    """The ID of the engine's image signed as ``digest``, pulled by ``location`` first when that
    names a registry (by digest, as the builder pushes; or by tag) and the engine lacks it.
    ArtifactVerificationFailed (``check`` = ``image``) when the engine cannot get it, or
    ``location`` resolves to another image: the message names both digests. ``where``
    (``service/revision``) starts every message."""
    have = _image_id(client, digest)
    if have is None and names_registry(location):
        try:
            client.images.pull(location)
        except docker.errors.DockerException as exc:
            raise _refused(
                where,
                f"pulling {location} failed: {_cut(exc)}",
                "pull_failed",
                location,
                digest,
            ) from exc
        have = _image_id(client, digest)
    if have is None:
        other = _image_id(client, location)
        if other is not None:  # pulled (or tagged) as the reference, but not what was signed
            raise _refused(
                where,
                f"image reference {location} resolves to image digest {other}, not to the "
                f"signed digest {digest}: it was retagged or replaced after it was signed",
                "image_mismatch",
                location,
                digest,
                actual=other,
            )
        raise _refused(
            where,
            f"the Docker Engine holds no image {digest} (the signed one; built as {location})",
            "image_missing",
            location,
            digest,
        )
    resolved = _image_id(client, location)
    if resolved is None and is_registry_reference(location):
        # A reference by digest cannot be moved to another image; the engine holds the signed
        # one (built here, or pulled under another name) and simply never pulled this name.
        return have
    if resolved is None:
        raise _refused(
            where,
            f"image reference {location} names no image in the Docker Engine (the signed image "
            f"{digest} is there: the reference was removed)",
            "reference_missing",
            location,
            digest,
        )
    if resolved != have:
        raise _refused(
            where,
            f"image reference {location} resolves to image digest {resolved}, not to the "
            f"signed digest {digest}: it was retagged or replaced after it was signed",
            "image_mismatch",
            location,
            digest,
            actual=resolved,
        )
    return have


def _image_id(client: docker.DockerClient, name: str) -> str | None:
    try:
        return str(client.images.get(name).id)
    except docker.errors.ImageNotFound:
        return None
    except docker.errors.NotFound:
        return None
    except docker.errors.DockerException as exc:
        raise ArtifactVerificationFailed(
            f"the Docker Engine could not be asked about image {name}: {_cut(exc)}",
            check="image",
            reason="engine_error",
        ) from exc


def _refused(
    where: str, why: str, reason: str, location: str, digest: str, **extra: str
) -> ArtifactVerificationFailed:
    return ArtifactVerificationFailed(
        f"agent refused to start {where}: image check failed: {why}",
        check="image",
        reason=reason,
        location=location,
        digest=digest,
        **extra,
    )


def _cut(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= MAX_ERROR else text[:MAX_ERROR] + "..."
