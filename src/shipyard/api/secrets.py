"""The API's app secrets, included by ``api/app.py``::

    PUT    /api/v1/services/{service}/secrets/{name}   secret:write     {"value": "..."}: 201
                                                                        with the new version
    GET    /api/v1/services/{service}/secrets          deployment:read  names, versions, who
                                                                        set them and when
    DELETE /api/v1/services/{service}/secrets/{name}   secret:write     new deployments no
                                                                        longer get it

No route answers with a value, and none can: ``AppSecrets`` opens values only for
``orchestrator/artifacts.spec``. Listing needs only ``deployment:read`` (names and versions are
what ``GET /deployments/{id}`` shows anyway); both writes need ``secret:write`` for the service.
Thin routes over ``security/app_secrets.AppSecrets`` (``AppContext.secret_service``), which
seals, stores and audits (``secret.set`` / ``secret.removed``, with the token's subject and id).
Used by ``shipyard secret`` (cli/secrets.py).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from shipyard.api import problems
from shipyard.api.auth import Claims, require_permission
from shipyard.api.context import AppContext
from shipyard.domain.models import DNS_LABEL
from shipyard.security.app_secrets import MAX_VALUE_BYTES, NAME, VALUE_FORMAT, AppSecrets
from shipyard.store.secrets import SecretVersion

CanWrite = Annotated[Claims, Depends(require_permission("secret:write"))]
CanRead = Annotated[Claims, Depends(require_permission("deployment:read"))]
Service = Annotated[str, Path(pattern=DNS_LABEL, max_length=63)]
Name = Annotated[str, Path(pattern=NAME.pattern, max_length=256)]
_COMMON = (401, 403, 413, 422, 500, 503)

router = APIRouter(tags=["secrets"])


def _secrets(request: Request) -> AppSecrets:
    context: AppContext = request.app.state.context
    return context.secret_service()


Secrets = Annotated[AppSecrets, Depends(_secrets)]


class SecretSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: str = Field(
        min_length=1,
        # Characters: at most 4 bytes each, so any value the schema allows fits the store's limit.
        max_length=MAX_VALUE_BYTES // 4,
        json_schema_extra={"format": VALUE_FORMAT},
        description="The value (text without NUL): stored sealed, given to the service's "
        "replicas and hooks, never returned.",
    )


class SecretVersionRead(BaseModel):
    service: str
    name: str
    version: int = Field(description="Counts up from 1 per name; never reused.")
    updated_at: dt.datetime
    updated_by: str


class SecretList(BaseModel):
    service: str
    secrets: list[SecretVersionRead] = Field(description="Newest version of each, by name.")


class SecretRemoved(BaseModel):
    service: str
    name: str
    version: int = Field(description="The newest version it had.")


def _read(v: SecretVersion) -> dict[str, Any]:
    return {
        "service": v.service,
        "name": v.name,
        "version": v.version,
        "updated_at": dt.datetime.fromtimestamp(v.created_at, dt.UTC),
        "updated_by": v.created_by,
    }


@router.put(
    "/api/v1/services/{service}/secrets/{name}",
    status_code=201,
    response_model=SecretVersionRead,
    responses=problems.responses(400, *_COMMON),
)
async def set_secret(
    service: Service, name: Name, body: SecretSet, claims: CanWrite, secrets: Secrets
) -> dict[str, Any]:
    """Store a new version of the secret; the service's next deployment runs with it (the
    ones already running keep the version they were deployed with)."""
    claims.require("secret:write", service)
    added = await secrets.set(service, name, body.value, by=claims.subject,
                              token_id=claims.token_id)  # fmt: skip
    return _read(added)


@router.get(
    "/api/v1/services/{service}/secrets",
    response_model=SecretList,
    responses=problems.responses(*_COMMON),
)
async def list_secrets(service: Service, claims: CanRead, secrets: Secrets) -> dict[str, Any]:
    """The service's secrets: names, newest versions, who set them and when. Never values."""
    claims.require("deployment:read", service)
    return {"service": service, "secrets": [_read(v) for v in await secrets.list(service)]}


@router.delete(
    "/api/v1/services/{service}/secrets/{name}",
    response_model=SecretRemoved,
    responses=problems.responses(404, *_COMMON),
)
async def remove_secret(
    service: Service, name: Name, claims: CanWrite, secrets: Secrets
) -> dict[str, Any]:
    """Remove the secret: deployments from now on fail until it is set again (one naming it in
    ``[run] secrets``); revisions deployed with it keep their version, for rollbacks."""
    claims.require("secret:write", service)
    version = await secrets.remove(service, name, by=claims.subject, token_id=claims.token_id)
    return {"service": service, "name": name, "version": version}
