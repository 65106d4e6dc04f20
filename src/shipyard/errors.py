"""Shipyard's one error tree; every layer raises these and the edges map them in one place.

The type says what to do next (kopf's permanent/temporary split, httpx's drawn tree)::

    ShipyardError
    ├── PermanentError                  retrying the same thing will fail the same way
    │   ├── InvalidInput                bad request, flag or file: fix the input (HTTP 422)
    │   │   ├── AmbiguousDeploymentId   an id prefix that more than one deployment starts with
    │   │   ├── ManifestError           shipyard.toml missing or invalid, names the field
    │   │   ├── SourceError             unknown repository, commit, or commit not on branch
    │   │   │   └── SourceNotAllowed    outside --allow-source / --source-root
    │   │   └── UnknownRegion           target.region has no data plane configured
    │   ├── NotFound                    no such deployment / service (HTTP 404)
    │   ├── Conflict                    (HTTP 409)
    │   │   ├── DeploymentInProgress    one deployment per service at a time
    │   │   ├── LeaseLost               a replica's lease moved on: it may not write any more
    │   │   └── ReasonRequired          promote/abort of a Frozen deployment without a reason
    │   ├── InvariantViolation          a write that would make a record say something false
    │   ├── PrivateFileUnsafe           a secret's directory others may write, or a symlink
    │   ├── AuthError
    │   │   ├── Unauthenticated         missing/invalid/expired/forged token (HTTP 401)
    │   │   └── PermissionDenied        valid token without the claim (HTTP 403)
    │   └── DeploymentError             the ADR section 10 cases: the deployment ends with it
    │       ├── BuildFailed
    │       ├── SecurityScanFailed
    │       ├── ArtifactVerificationFailed
    │       ├── RevisionStartFailed     could not start (bad command, port in use, ...)
    │       ├── HealthCheckFailed       {attempts}: crashed, never healthy, or unhealthy in bake
    │       ├── TrafficSwitchFailed     the router did not take the weights we asked for
    │       ├── AnalysisFailed          a canary's metric analysis failed: it was aborted
    │       ├── StableRevisionMissing   the store names a serving revision the data plane lacks
    │       ├── DeploymentAborted       a human aborted it (POST /deployments/{id}/abort)
    │       ├── RegionUnreachable       {region}: a fleet's region did not answer in time
    │       ├── SecretMissing           a [run] secrets name not set for the service
    │       ├── RollbackFailed
    │       ├── HookFailed              {point, exit_code}: a [hooks] command failed
    │       └── GateRefused             {gate, status_code|timeout}: a webhook gate said no
    └── TransientError                  retry after ``retry_after`` seconds
        └── AgentUnavailable            the region's data plane did not answer

Adapters translate foreign exceptions at their boundary (``raise ... from exc``) so nothing from
subprocess, httpx or sqlite escapes into the orchestrator.

Every class here has its own ``code``, and so does any subclass elsewhere that says something
new (``PolicyError``, ``SigningKeyError``, ...): defining it registers it in ``ERRORS_BY_CODE``,
and a code already taken is refused. ``from_dict`` rebuilds an error stored with ``to_dict`` (the
cause of a rollback resumed after a restart) as its real class through that registry; a subclass
that keeps its parent's code comes back as the parent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: ``code`` -> class, for every error that has a code of its own (see the module docstring).
ERRORS_BY_CODE: dict[str, type[ShipyardError]] = {}


class ShipyardError(Exception):
    """Root of every error Shipyard raises on purpose."""

    #: Machine-readable name used in API problems and audit records.
    code: str = "shipyard_error"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            return  # keeps its parent's code, and is restored as its parent
        taken = ERRORS_BY_CODE.get(cls.code)
        if taken is not None and taken.__qualname__ != cls.__qualname__:
            raise TypeError(f"error code {cls.code!r} of {cls.__name__} is {taken.__name__}'s")
        ERRORS_BY_CODE[cls.code] = cls

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.detail: dict[str, Any] = detail

    def to_dict(self) -> dict[str, Any]:
        """The error as stored on a deployment and sent in problem responses."""
        return {
            "type": type(self).__name__,
            "code": self.code,
            "message": self.message,
            **self.detail,
        }


class PermanentError(ShipyardError):
    code = "permanent_error"


class TransientError(ShipyardError):
    code = "transient_error"

    def __init__(self, message: str, *, retry_after: float = 1.0, **detail: Any) -> None:
        super().__init__(message, **detail)
        self.retry_after = retry_after


class InvalidInput(PermanentError):
    code = "invalid_input"


class ManifestError(InvalidInput):
    code = "invalid_manifest"


class AmbiguousDeploymentId(InvalidInput):
    """A deployment id prefix that several deployments start with (``candidates`` lists them)."""

    code = "ambiguous_deployment_id"


class SourceError(InvalidInput):
    code = "invalid_source"


class SourceNotAllowed(SourceError):
    """The repository is outside the server's allow-list (``build/source_policy.py``)."""

    code = "source_not_allowed"


class UnknownRegion(InvalidInput):
    code = "unknown_region"


class NotFound(PermanentError):
    code = "not_found"


class Conflict(PermanentError):
    code = "conflict"


class DeploymentInProgress(Conflict):
    code = "deployment_in_progress"


class LeaseLost(Conflict):
    """A write under a lease whose fencing token moved on (another replica took the deployment
    or the janitor over, ``store/leases.py``): nothing of it was written, and the replica stops
    driving at once; the new holder continues."""

    code = "lease_lost"


class ReasonRequired(Conflict):
    """``promote`` or ``abort`` of a Frozen deployment without a reason (it is audited): the
    body's ``reason`` is optional, the deployment's state makes it required (HTTP 409)."""

    code = "reason_required"


class InvariantViolation(PermanentError):
    """A write refused because the record would then say something false (a Shipyard bug:
    e.g. the serving revision also marked warm, which the janitor would later retire)."""

    code = "invariant_violation"


class PrivateFileUnsafe(PermanentError):
    """A key or token file would sit where someone else could read or replace it (a directory
    writable by group or others, or owned by another user) or behind a symlink
    (``private_files``): nothing was written; fix the directory."""

    code = "private_file_unsafe"


class AuthError(PermanentError):
    code = "auth_error"


class Unauthenticated(AuthError):
    code = "unauthenticated"


class PermissionDenied(AuthError):
    code = "insufficient_permissions"


class DeploymentError(PermanentError):
    """A deployment could not complete; the deployment records it and ends Failed/RolledBack."""

    code = "deployment_failed"


class BuildFailed(DeploymentError):
    code = "build_failed"


class SecurityScanFailed(DeploymentError):
    code = "security_scan_failed"

    def __init__(self, message: str, *, vulnerabilities: int, **detail: Any) -> None:
        super().__init__(message, vulnerabilities=vulnerabilities, **detail)
        self.vulnerabilities = vulnerabilities


class ArtifactVerificationFailed(DeploymentError):
    code = "artifact_verification_failed"


class RevisionStartFailed(DeploymentError):
    code = "revision_start_failed"


class HealthCheckFailed(DeploymentError):
    code = "health_check_failed"

    def __init__(self, message: str, *, attempts: int, **detail: Any) -> None:
        super().__init__(message, attempts=attempts, **detail)
        self.attempts = attempts


class TrafficSwitchFailed(DeploymentError):
    code = "traffic_switch_failed"


class AnalysisFailed(DeploymentError):
    """A canary's analysis failed (or could not measure within its limits): it was aborted."""

    code = "analysis_failed"


class StableRevisionMissing(DeploymentError):
    """The store says a revision serves, but the data plane runs no ready replica of it and it
    could not be restarted: the deployment refuses to proceed (nothing was changed)."""

    code = "stable_revision_missing"


class DeploymentAborted(DeploymentError):
    """A human aborted the deployment (``POST /api/v1/deployments/{id}/abort``)."""

    code = "deployment_aborted"


class RegionUnreachable(DeploymentError):
    """A region of a fleet deployment did not answer within ``[fleet] region_timeout_seconds``
    (``runtime/fleet.py``); ``region`` in the detail names it."""

    code = "region_unreachable"


class SecretMissing(DeploymentError):
    """A secret the manifest names (``[run] secrets`` / ``secret_files``) is not set for the
    service, or a version a revision recorded is gone: nothing was started."""

    code = "secret_missing"


class RollbackFailed(DeploymentError):
    code = "rollback_failed"


class HookFailed(DeploymentError):
    """A ``[hooks]`` command exited non-zero or ran past its ``timeout_seconds``
    (``orchestrator/hooks.py``); the detail names the ``point``, ``exit_code`` (None: killed
    at its timeout) and ``timed_out``; the message ends with its last lines of output."""

    code = "hook_failed"


class GateRefused(DeploymentError):
    """A ``[[gates]]`` webhook with ``on_timeout = "fail"`` answered other than 2xx, or not in
    time (``orchestrator/steps/gates.py``); ``gate``, ``at`` and ``status_code`` (or
    ``timeout``) in the detail."""

    code = "gate_refused"


class AgentUnavailable(TransientError):
    code = "agent_unavailable"


ERRORS_BY_CODE[ShipyardError.code] = ShipyardError

_ENVELOPE = ("type", "code", "message")


def from_dict(stored: Mapping[str, Any]) -> ShipyardError:
    """The error ``to_dict`` wrote, as its own class again (``isinstance`` works on it).

    A code this Shipyard does not know (written by a newer one) comes back as a
    ``DeploymentError`` with the same message and detail.
    """
    cls = ERRORS_BY_CODE.get(str(stored.get("code")), DeploymentError)
    message = str(stored.get("message", ""))
    detail = {k: v for k, v in stored.items() if k not in _ENVELOPE}
    try:
        return cls(message, **detail)
    except TypeError:  # detail without a field the class requires (e.g. attempts)
        return DeploymentError(message, **detail)
