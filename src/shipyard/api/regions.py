"""The API's remote regions, included by ``api/app.py`` (permission ``region:admin``)::

    POST   /api/v1/regions          {"name", "ttl_seconds"}: register a region, 201 with its
                                    one-time join token (and the join command when the fleet
                                    listener is on)
    GET    /api/v1/regions          every registered region: URL, joined, certificate serial
    DELETE /api/v1/regions/{name}   remove it: its agent's certificate is refused from now on and
                                    this server stops dialing it; 409 while a deployment is
                                    active there

Thin routes over ``api/fleet_control.RegionService``; audited there (``region.added``,
``region.removed``; ``region.joined`` when the agent joins through the fleet listener).
``shipyard region`` (cli/regions.py) does the same on the data directory.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from shipyard.api import problems
from shipyard.api.auth import Claims, require_permission
from shipyard.api.context import AppContext
from shipyard.api.fleet import listener_urls
from shipyard.api.fleet_control import DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL, RegionService
from shipyard.domain.models import DNS_LABEL
from shipyard.store.regions import RegionRow

CanAdmin = Annotated[Claims, Depends(require_permission("region:admin"))]
Name = Annotated[str, Path(pattern=DNS_LABEL, max_length=63)]
_COMMON = (401, 403, 413, 500, 503)

router = APIRouter(tags=["regions"])


def _regions(request: Request) -> RegionService:
    context: AppContext = request.app.state.context
    return context.region_service()


Regions = Annotated[RegionService, Depends(_regions)]


class RegionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=DNS_LABEL, max_length=63, description="The region's name.")
    ttl_seconds: int = Field(
        default=DEFAULT_TOKEN_TTL, ge=1, le=MAX_TOKEN_TTL, description="The join token's life."
    )


class RegionRead(BaseModel):
    name: str
    agent_url: str | None = Field(description="The agent's API, once it joined.")
    cert_serial: str | None
    created_at: dt.datetime
    joined_at: dt.datetime | None


class RegionAdded(BaseModel):
    name: str
    token: str = Field(description="One-time join token; shown once, stored hashed.")
    token_id: str
    expires_at: dt.datetime
    ca_fingerprint: str
    join_command: str | None = Field(description="With the fleet listener on: what to run.")


class RegionList(BaseModel):
    regions: list[RegionRead]


def _when(ts: float | None) -> dt.datetime | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC)


def read(row: RegionRow) -> RegionRead:
    return RegionRead(
        name=row.name,
        agent_url=row.agent_url,
        cert_serial=row.cert_serial,
        created_at=dt.datetime.fromtimestamp(row.created_at, dt.UTC),
        joined_at=_when(row.joined_at),
    )


def join_command(service: RegionService, token: str) -> str | None:
    """``shipyard agent --join ...`` for ``token`` with every replica's listener (one ``--join``
    each, from ``<shared>/fleet.json``), or None when no fleet listener ever ran."""
    urls = listener_urls(service.shared_dir)
    if not urls:
        return None
    joins = " ".join(f"--join {url}" for url in urls)
    return f"shipyard agent {joins} --token {token} --data-dir DIR --listen HOST:PORT"


@router.post(
    "/api/v1/regions",
    status_code=201,
    # 400: a body that is not even text (FastAPI's "error parsing the body").
    responses=problems.responses(400, 409, 422, *_COMMON),
)
async def add_region(body: RegionCreate, claims: CanAdmin, regions: Regions) -> RegionAdded:
    """Register a region and issue its one-time join token (expires after ``ttl_seconds``)."""
    added = await regions.add(body.name, body.ttl_seconds, by=claims.subject)
    return RegionAdded(
        name=added.region,
        token=added.token,
        token_id=added.token_id,
        expires_at=dt.datetime.fromtimestamp(added.expires_at, dt.UTC),
        ca_fingerprint=added.fingerprint,
        join_command=join_command(regions, added.token),
    )


@router.get("/api/v1/regions", responses=problems.responses(*_COMMON))
async def list_regions(_: CanAdmin, regions: Regions) -> RegionList:
    """Every registered region, joined or still waiting for its agent."""
    return RegionList(regions=[read(r) for r in await regions.list()])


@router.delete("/api/v1/regions/{name}", responses=problems.responses(404, 409, 422, *_COMMON))
async def remove_region(name: Name, claims: CanAdmin, regions: Regions) -> dict[str, Any]:
    """Remove a region: refused (409) while a deployment is active there."""
    row = await regions.remove(name, by=claims.subject)
    return {"name": row.name, "removed": True}
