"""The bodies of the API's successful answers, as pydantic models (``...Read``, ``...List``).

``api/app.py`` declares them on its routes (``response_model=`` or, for routes answering with a
ready ``JSONResponse``, ``responses=``), so the OpenAPI schema says what each 2xx body is, and
FastAPI checks every dict a route returns against its model before sending it. Error bodies are
``api/problems.py``'s. The deployment resource and the ``?wait=true`` result are the domain's own
read models (``domain.models.Deployment``, ``DeploymentResult``).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from shipyard.domain.models import Deployment, DeploymentResult, DeploymentStatus
from shipyard.runtime.base import ReplicaState


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class DeploymentAccepted(BaseModel):
    """202: the deployment (or rollback, abort, promotion) is under way; poll ``status_url``
    (also the ``Location`` header)."""

    deployment_id: uuid.UUID
    status: DeploymentStatus
    status_url: str
    service: str
    region: str
    kind: Literal["deploy", "rollback"]
    detail: str | None = Field(
        default=None, description="With ?wait=true: why the answer is still 202 (the timeout)."
    )
    regions: list[str] | None = Field(
        default=None, description="A fleet deployment's regions (absent for one region)."
    )
    trace_id: str | None = Field(
        default=None,
        description="The deployment's OpenTelemetry trace id (32 hex digits; absent for "
        "records made before tracing).",
    )


class DecisionCreate(BaseModel):
    """The body of ``promote`` and ``abort`` (a request body, beside the answers): why. Optional,
    except for a Frozen deployment, whose promote or abort is refused without one (409
    ``reason_required``); audited."""

    reason: str | None = Field(default=None, min_length=1, max_length=1000)


class DeploymentFailed(BaseModel):
    """500 of ``?wait=true``: the deployment ended without serving its revision (the ADR
    handler's ``deployment_failed``; ``cause`` is the recorded error)."""

    error: Literal["deployment_failed"]
    message: str
    deployment_id: uuid.UUID
    status: DeploymentStatus
    cause: dict[str, Any]
    result: DeploymentResult | None


class DeploymentList(BaseModel):
    deployments: list[Deployment]


class BuildLogRead(BaseModel):
    """A slice of the build log (at most 64 KiB) from the requested offset."""

    offset: int = Field(ge=0, description="Where the next poll starts (the bytes read so far).")
    text: str = Field(description="UTF-8, undecodable bytes replaced.")
    building: bool = Field(description="Whether the log may still grow.")


class AuditRecordRead(BaseModel):
    seq: int
    timestamp: str
    event_type: str
    deployment_id: str | None
    service: str | None
    region: str | None
    user: str | None
    status: str | None
    duration_ms: int | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str


class AuditList(BaseModel):
    records: list[AuditRecordRead]


class KeyList(BaseModel):
    keys: list[dict[str, Any]] = Field(
        description="securesystemslib key dicts, each with its keyid."
    )


class ServiceSummary(BaseModel):
    service: str
    region: str
    serving_revision: str | None
    url: str | None


class ServiceList(BaseModel):
    services: list[ServiceSummary]


class ReplicaRead(BaseModel):
    replica_id: str
    revision: str
    state: ReplicaState
    ready: bool
    port: int
    pid: int | None
    exit_code: int | None
    restarts: int


class ServiceRead(BaseModel):
    service: str
    region: str
    url: str | None
    serving_revision: str | None
    warm_revision: str | None
    warm_until: float | None
    weights: dict[str, int]
    replicas: list[ReplicaRead]
    active_deployment: str | None
    warnings: list[str]


class TokenRead(BaseModel):
    """An issued token as the registry keeps it: never the token itself."""

    id: str
    subject: str
    permissions: list[str]
    issued_at: str
    expires_at: str
    issued_by: str | None
    revoked_at: str | None
    revoked_by: str | None


class TokenList(BaseModel):
    tokens: list[TokenRead]
