"""The API's service operations outside any deployment, installed by ``api/app.py``:

    PUT    /api/v1/services/{name}/replicas   service:scale    {"replicas": N}: scale the serving
                                                               revision (health-gated, drained)
    DELETE /api/v1/services/{name}            service:delete   stop every replica, remove the route

Thin routes over ``orchestrator/services.py`` (``Pipeline.services``); both answer 409 naming
the deployment while one is in flight (``shipyard status/abort <id>``), and both are audited
(``service.scaled``, ``service.deleted``) with the token's subject and id. Used by ``shipyard
scale`` and ``shipyard service delete`` (cli/services.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from shipyard.api import problems
from shipyard.api.auth import Claims, require_permission
from shipyard.api.context import AppContext
from shipyard.domain.models import DNS_LABEL
from shipyard.orchestrator.services import MAX_REPLICAS, MIN_REPLICAS

CanScale = Annotated[Claims, Depends(require_permission("service:scale"))]
CanDelete = Annotated[Claims, Depends(require_permission("service:delete"))]
Name = Annotated[str, Path(pattern=DNS_LABEL, max_length=63)]
Region = Annotated[str, Query(pattern=DNS_LABEL, max_length=63)]
#: What every route here may answer besides its own (see api/app.py's ``_AUTH``).
_COMMON = (401, 403, 404, 409, 413, 422, 500, 503)


def _ctx(request: Request) -> AppContext:
    context: AppContext = request.app.state.context
    return context


Ctx = Annotated[AppContext, Depends(_ctx)]


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(ge=MIN_REPLICAS, le=MAX_REPLICAS, description="Replicas to run.")


class ServiceScaleRead(BaseModel):
    service: str
    region: str
    revision: str = Field(description="The serving revision, which now runs `replicas`.")
    previous: int = Field(description="How many replicas it ran before.")
    replicas: int
    started: list[str] = Field(description="Replicas started (healthy, in rotation).")
    stopped: list[str] = Field(description="Replicas drained and stopped.")


class ServiceDeleteRead(BaseModel):
    service: str
    region: str
    revisions: list[str] = Field(description="Revisions whose replicas were stopped.")
    replicas: int = Field(description="Replicas the service had.")
    url: str | None = Field(description="The route that no longer exists.")


async def scale_service(
    name: Name, body: ScaleRequest, claims: CanScale, c: Ctx, region: Region = "local"
) -> dict[str, Any]:
    """Run ``replicas`` replicas of the serving revision without a deployment: new ones join
    the rotation once healthy, removed ones are drained first. Kept by the reconciler while
    this revision serves; the next deployment runs its manifest's ``[run] replicas``."""
    claims.require("service:scale", name)
    done = await c.pipeline.services.scale(
        name, region, body.replicas, claims.subject, token_id=claims.token_id
    )
    return {
        "service": done.service,
        "region": done.region,
        "revision": done.revision,
        "previous": done.previous,
        "replicas": done.replicas,
        "started": list(done.started),
        "stopped": list(done.stopped),
    }


async def delete_service(
    name: Name, claims: CanDelete, c: Ctx, region: Region = "local"
) -> dict[str, Any]:
    """Delete a service: drain and stop every replica, remove its route and its record. Its
    deployments stay in the history and the audit trail."""
    claims.require("service:delete", name)
    done = await c.pipeline.services.delete(name, region, claims.subject, token_id=claims.token_id)
    return {
        "service": done.service,
        "region": done.region,
        "revisions": list(done.revisions),
        "replicas": done.replicas,
        "url": done.url,
    }


def install(app: FastAPI) -> None:
    """Add the routes to ``app`` itself rather than through an included ``APIRouter``: a 405's
    ``Allow`` is computed from the app's own routes (``problems._allowed``), and the service
    path has one route per method (``GET`` in app.py, ``DELETE`` here)."""
    app.add_api_route(
        "/api/v1/services/{name}/replicas",
        scale_service,
        methods=["PUT"],
        tags=["services"],
        response_model=ServiceScaleRead,
        # 400: a body that is not even text (FastAPI's "error parsing the body")
        responses=problems.responses(400, *_COMMON),
    )
    app.add_api_route(
        "/api/v1/services/{name}",
        delete_service,
        methods=["DELETE"],
        tags=["services"],
        response_model=ServiceDeleteRead,
        responses=problems.responses(*_COMMON),
    )
