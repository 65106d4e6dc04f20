"""The agent's control API (FastAPI, loopback, bearer token): what ``runtime.local.LocalRuntime``
calls to start and stop revisions, route weights, read logs and metrics, drive load, and run a
revision's hooks (``agent.hooks``: the answer streams the hook's output as NDJSON). Built
for one ``agent.server.Agent`` by ``build_app`` (``agent.server.run_agent`` serves it); the
request bodies are checked here, before the agent sees them.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import re
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from shipyard.agent import replica_logs
from shipyard.agent.hooks import HookRunner
from shipyard.agent.loading import MAX_LEASE_SECONDS, LoadSpec
from shipyard.domain.models import DNS_LABEL, MAX_LOAD_RPS
from shipyard.domain.release import HookPoint
from shipyard.errors import (
    NotFound,
    ShipyardError,
)
from shipyard.runtime.base import MAX_LOG_LINES, HookRun, LogQuery, RevisionSpec

if TYPE_CHECKING:
    from shipyard.agent.server import Agent


class WeightsBody(BaseModel):
    #: Insertion order matters with sticky keys: cumulative hash ranges follow it (canary first).
    weights: dict[str, Annotated[int, Field(ge=0, le=100)]]
    #: Sticky canary assignment: the header / cookie naming a user (both None: not sticky).
    sticky_header: str | None = None
    sticky_cookie: str | None = None


class RoutableBody(BaseModel):
    replica_ids: list[str]
    routable: bool


class RouterLimitsBody(BaseModel):
    """A service's own router limits over the agent's defaults; a field left out (or null)
    takes the agent's default."""

    head_timeout: Annotated[float, Field(gt=0, le=86400)] | None = None
    keepalive_timeout: Annotated[float, Field(gt=0, le=86400)] | None = None
    body_timeout: Annotated[float, Field(gt=0, le=86400)] | None = None
    response_timeout: Annotated[float, Field(gt=0, le=86400)] | None = None
    max_connections: Annotated[int, Field(gt=0, le=10_000_000)] | None = None

    model_config = {"extra": "forbid"}


class LoadBody(BaseModel):
    """The built-in load step (agent/loading.py): ``GET path`` at ``rps`` to ``revision``, for
    ``lease_seconds`` unless renewed."""

    revision: Annotated[str, Field(min_length=1, max_length=200)]
    rps: Annotated[float, Field(gt=0, le=MAX_LOAD_RPS)]
    path: Annotated[str, Field(min_length=1, max_length=2048, pattern=r"^/[!-~]*$")] = "/"
    lease_seconds: Annotated[float, Field(gt=0, le=MAX_LEASE_SECONDS)] = 60.0

    model_config = {"extra": "forbid"}


class LogQueryBody(BaseModel):
    """``runtime.base.LogQuery`` on the wire (``POST /v1/services/{s}/logs``)."""

    revision: Annotated[str, Field(max_length=200)] | None = None
    replica_id: Annotated[str, Field(max_length=300)] | None = None
    tail: Annotated[int, Field(ge=0, le=MAX_LOG_LINES)] = 200
    since: float | None = None
    after: dict[str, Annotated[int, Field(ge=0)]] | None = None

    model_config = {"extra": "forbid"}


class HookBody(BaseModel):
    """One hook to run once (``runtime.base.HookRun``) in the revision ``spec`` describes."""

    spec: dict[str, Any]
    point: HookPoint
    argv: Annotated[
        list[Annotated[str, Field(max_length=65536)]], Field(min_length=1, max_length=4096)
    ]
    timeout_seconds: Annotated[float, Field(gt=0, le=3600)]

    model_config = {"extra": "forbid"}


class StopBody(BaseModel):
    replica_ids: list[str] = Field(default_factory=list)
    drain_timeout: Annotated[float, Field(ge=0, le=3600)] = 30.0


def build_app(agent: Agent, *, require_token: bool = True) -> FastAPI:
    """The agent's control API (loopback, bearer token). ``require_token`` False: a joined
    agent, served over mutual TLS whose handshake already required the controller's client
    certificate (security/pki.agent_server_context), so no token exists to check."""

    async def authenticated(request: Request) -> None:
        if not require_token:
            return
        header = request.headers.get("authorization", "")
        presented = header.removeprefix("Bearer ").strip()
        if not hmac.compare_digest(presented.encode(), agent.token.encode()):
            raise HTTPException(401, "agent token missing or wrong")

    app = FastAPI(title="shipyard agent", dependencies=[Depends(authenticated)], openapi_url=None)
    hooks = HookRunner(agent.supervisor, agent.supervisor._mask)

    @app.exception_handler(ShipyardError)
    async def _shipyard_error(_: Request, exc: ShipyardError) -> JSONResponse:
        return JSONResponse(status_code=422, content=exc.to_dict())

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        await agent.connect_engine()
        return {
            "ok": True,
            "region": agent.region,
            "pid": os.getpid(),
            "artifact_kinds": agent.artifact_kinds(),
            "docker": {"address": agent.engine.where, "error": agent.engine.error},
        }

    @app.get("/v1/services")
    async def services() -> list[str]:
        return sorted(agent.routes)

    @app.put("/v1/services/{service}")
    async def ensure(service: str) -> dict[str, Any]:
        await agent.ensure_service(service)
        return agent.service_state(service)

    @app.get("/v1/services/{service}")
    async def state(service: str) -> dict[str, Any]:
        return agent.service_state(service)

    @app.delete("/v1/services/{service}")
    async def remove(service: str) -> dict[str, Any]:
        agent.stop_load(service)
        for r in agent.supervisor.of_service(service):
            await agent.supervisor.stop(r)
        route = agent.routes.pop(service, None)
        if route is not None:
            agent._configure_entries()  # its hosts answer 404 from now on
            await route.proxy.close()
        agent._save_state()
        return {"removed": route is not None}

    @app.put("/v1/services/{service}/revisions/{revision}")
    async def start(service: str, revision: str, spec: dict[str, Any]) -> dict[str, Any]:
        try:
            rs = RevisionSpec.from_dict(spec)
        except (TypeError, ValueError) as exc:
            raise HTTPException(422, f"invalid revision spec: {exc}") from exc
        if rs.service != service or rs.revision != revision:
            raise HTTPException(422, "spec does not match the path's service/revision")
        rs = await agent.localise(rs)  # a joined agent's own copy of the artifact
        await agent.verify(rs)  # before anything changes: a refused start leaves no trace
        if rs.entry is not None:  # hosts and port first: a conflict starts nothing
            await agent.apply_entry(service, rs.entry)
        else:
            await agent.ensure_service(service)
        replicas = await agent.supervisor.start_revision(rs)
        agent._save_state()
        return {"replicas": [r.status().to_dict() for r in replicas]}

    @app.post("/v1/services/{service}/hooks")
    async def hook(service: str, body: HookBody) -> StreamingResponse:
        """Run a hook of a revision once (``agent.hooks``), its artifact verified as a start's
        is; the answer is its output and then its result, as NDJSON."""
        try:
            rs = RevisionSpec.from_dict(body.spec)
        except (TypeError, ValueError) as exc:
            raise HTTPException(422, f"invalid revision spec: {exc}") from exc
        if rs.service != service:
            raise HTTPException(422, "spec does not match the path's service")
        rs = await agent.localise(rs)
        await agent.verify(rs)  # before anything runs: an unsigned or changed artifact never
        running = await hooks.start(rs, HookRun(body.point, body.argv, body.timeout_seconds))
        return StreamingResponse(running.stream(), media_type="application/x-ndjson")

    @app.post("/v1/services/{service}/routable")
    async def routable(service: str, body: RoutableBody) -> dict[str, Any]:
        for rid in body.replica_ids:
            r = agent.supervisor.replicas.get(rid)
            if r is None or r.spec.service != service:
                raise HTTPException(404, f"replica {rid} not found in {service}")
            if body.routable and not r.alive:
                raise HTTPException(409, f"replica {rid} is {r.state}; it cannot take traffic")
        for rid in body.replica_ids:
            agent.supervisor.replicas[rid].routable = body.routable
        route = await agent.ensure_service(service)
        agent._reconfigure(route)
        agent._save_state()
        return agent.service_state(service)

    @app.post("/v1/services/{service}/stop")
    async def stop(service: str, body: StopBody) -> dict[str, Any]:
        """Stop replicas: no new requests first, in-flight ones finish (drain), then SIGTERM."""
        targets = [
            agent.supervisor.replicas[r] for r in body.replica_ids if r in agent.supervisor.replicas
        ]
        route = agent.routes.get(service)
        for r in targets:
            r.routable = False
        if route is not None:
            agent._reconfigure(route)
            # Each replica finishes the requests it holds (the router counts its open upstream
            # connections); then a revision-wide drain covers requests still being retried.
            await asyncio.gather(
                *(route.proxy.drain_replica(r.replica_id, body.drain_timeout) for r in targets)
            )
            for rev in {r.spec.revision for r in targets}:
                if not any(x.routable for x in agent.supervisor.of_revision(service, rev)):
                    await route.proxy.drain(rev, body.drain_timeout)
        await asyncio.gather(*(agent.supervisor.stop(r) for r in targets))
        agent._save_state()
        return agent.service_state(service) if route else {"stopped": len(targets)}

    @app.put("/v1/services/{service}/limits")
    async def limits(service: str, body: RouterLimitsBody) -> dict[str, Any]:
        """This service's router timeouts and connection cap (fields left out: the agent's)."""
        overrides = body.model_dump(exclude_none=True)
        return {"limits": agent.set_limits(service, overrides).to_dict()}

    @app.put("/v1/services/{service}/weights")
    async def weights(service: str, body: WeightsBody) -> dict[str, Any]:
        return {
            "weights": agent.set_weights(
                service, body.weights, body.sticky_header, body.sticky_cookie
            )
        }

    @app.put("/v1/services/{service}/load")
    async def load(service: str, body: LoadBody) -> dict[str, Any]:
        try:
            spec = LoadSpec(body.revision, body.rps, body.path)
            run = await agent.drive_load(service, spec, body.lease_seconds)
        except KeyError:
            raise HTTPException(404, f"service {service} has no route on this agent") from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        return {"load": run.describe()}

    @app.delete("/v1/services/{service}/load")
    async def unload(service: str) -> dict[str, Any]:
        run = agent.stop_load(service)
        return {"load": None if run is None else run.describe()}

    @app.post("/v1/services/{service}/logs")
    async def logs(service: str, body: LogQueryBody) -> dict[str, Any]:
        """Replica logs (``runtime.base.LogQuery``): read in a worker thread, from disk."""
        if not re.fullmatch(DNS_LABEL, service):  # never a path outside the logs directory
            raise HTTPException(404, f"no logs of service {service!r} on this agent")
        service_dir = agent.supervisor.logs_dir / service
        try:
            batch = await asyncio.to_thread(
                replica_logs.read, service_dir, LogQuery.from_dict(body.model_dump())
            )
        except NotFound as exc:
            raise HTTPException(404, exc.message) from exc
        return batch.to_dict()

    @app.get("/v1/services/{service}/metrics")
    async def metrics(service: str) -> dict[str, Any]:
        route = agent.routes.get(service)
        if route is None:
            raise HTTPException(404, f"service {service} has no route on this agent")
        return {rev: m.to_dict() for rev, m in route.proxy.metrics().items()}

    return app
